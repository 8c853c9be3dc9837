"""Pure-PyTorch Philox4x32-10, bit-compatible with ``triton.language.random``.

The fused kernels draw the flow-matching source and time in registers with ``tl.randn`` /
``tl.rand``; the reference must see exactly the same numbers, so this module reproduces
Triton's generator on any torch device:

* ``randint4x(seed, offset)`` -- the four uint32 words of Philox4x32 with 10 rounds, counter
  ``(offset_lo, offset_hi, 0, 0)`` and key ``(seed_lo, seed_hi)``: bit-exact.
* ``rand(seed, offset)`` -- first word mapped to [0, 1) as Triton does: bit-exact.
* ``randn(seed, offset)`` -- Box-Muller of the first two uniforms (cos branch): within ~1e-6
  (``log``/``cos`` are not correctly rounded on either side).

uint32 words are carried in int64 tensors holding values in [0, 2**32). Multiplications are
split into 16-bit halves so that no intermediate exceeds 2**50: torch has no unsigned 64-bit
arithmetic and signed overflow is not something to rely on.

``seed`` may be a Python int in [0, 2**63) or a 0-dim integer tensor (kept on its device, so a
CUDA-graph-captured step can advance it without a host sync). ``offset`` is an integer tensor.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9  # key schedule increments (golden ratio, sqrt(3) - 1)
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53  # round multipliers
_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
# Triton: scale = ((2**23 - 1) / 2**23) * 2**-31, the largest value with MAX_INT32 * scale < 1.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``const * x`` for a uint32 constant and uint32 values."""
    c_hi, c_lo = const >> 16, const & 0xFFFF
    x_hi, x_lo = x >> 16, x & 0xFFFF
    low = c_lo * x_lo  # < 2**32
    mid = c_hi * x_lo + c_lo * x_hi + (low >> 16)  # < 2**34
    hi = c_hi * x_hi + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (low & 0xFFFF)
    return hi & _MASK32, lo


def _seed_words(seed: int | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key words (seed_lo, seed_hi) as int64 tensors on ``like``'s device."""
    if isinstance(seed, torch.Tensor):
        s = seed.to(device=like.device, dtype=torch.int64)
    else:
        s = torch.tensor(int(seed), dtype=torch.int64, device=like.device)
    return s & _MASK32, (s >> 32) & _MASK32


def randint4x(seed: int | torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Four uint32 words (as int64 in [0, 2**32)) per offset, exactly ``tl.randint4x``."""
    offset = offset.to(torch.int64)
    c0 = offset & _MASK32
    c1 = (offset >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = _seed_words(seed, offset)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def randint(seed: int | torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """First Philox word per offset (``tl.randint``), as int64 in [0, 2**32)."""
    return randint4x(seed, offset)[0]


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> float32 in [0, 1): reinterpret as int32, fold negatives with ``~x``."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, ~signed, signed)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def rand(seed: int | torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) per offset, exactly ``tl.rand``."""
    return uint_to_uniform(randint(seed, offset))


def randn(seed: int | torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 per offset, as ``tl.randn``: Box-Muller cos branch of words 0, 1."""
    w0, w1, _, _ = randint4x(seed, offset)
    u1 = torch.clamp_min(uint_to_uniform(w0), 1.0e-7)
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * uint_to_uniform(w1)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta)
