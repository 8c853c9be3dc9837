"""The SFR weight schedule and the per-step source seeds: pure functions of the training step.

Both depend only on integers the trainer already knows (seed, global step, micro-step, rank), so a
run resumed from a checkpoint sees exactly the lambda values and flow draws of an uninterrupted one.

lambda schedule (docs/design.md, "Who gets which gradient: the phases")::

    step <  A:              lambda = 0                                   phase A (head learns alone)
    A <= step < A + R:      lambda = lambda_max * (step - A + 1) / R     linear ramp
    step >= A + R:          lambda = lambda_max

with ``A = phase_a_steps``, ``R = ramp_steps`` and ``step`` the 0-based index of the optimizer step
being computed (``TrainerState.global_step`` before it is incremented). The first ramp step already
has a non-zero weight and the last one reaches ``lambda_max``; ``R = 0`` jumps straight to it.
"""
from __future__ import annotations

import torch

from sfr.checks import check_int

_MASK64 = (1 << 64) - 1
SEED_BITS = 62  # the time stream uses seed + 1, so stay well inside int64


def sfr_lambda(step: int, phase_a_steps: int, ramp_steps: int, lambda_max: float) -> float:
    """The weight ``lambda`` of the SFR gradient into the backbone at optimizer step ``step``."""
    for name, value in (("step", step), ("phase_a_steps", phase_a_steps), ("ramp_steps", ramp_steps)):
        check_int(name, value, 0)
    if lambda_max < 0:
        raise ValueError(f"lambda_max must be >= 0, got {lambda_max!r}")
    if step < phase_a_steps:
        return 0.0
    if ramp_steps == 0:
        return float(lambda_max)
    progress = min(1.0, (step - phase_a_steps + 1) / ramp_steps)
    return float(lambda_max) * progress


def _splitmix64(x: int) -> int:
    """One SplitMix64 output for the 64-bit state ``x`` (a strong, cheap integer mixer)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int, micro_step: int = 0, rank: int = 0) -> int:
    """Philox seed of one micro-batch: a hash of ``(seed, step, micro_step, rank)`` in ``[0, 2**62)``.

    Hashing (rather than ``seed + step``) keeps the noise stream ``k`` and the time stream ``k + 1``
    of one micro-batch unrelated to those of any other micro-batch.
    """
    for name, value in (("seed", seed), ("step", step), ("micro_step", micro_step), ("rank", rank)):
        check_int(name, value, 0)
    state = _splitmix64(seed & _MASK64)
    for part in (step, micro_step, rank):
        state = _splitmix64(state ^ (part & _MASK64))
    return state >> (64 - SEED_BITS)


def device_seed(seed: int, step: int, micro_step: int = 0, rank: int = 0, device=None) -> torch.Tensor:
    """:func:`step_seed` as a 0-dim int64 tensor on ``device``.

    ``torch.full`` launches a fill kernel with the value as an argument: no host-to-device copy of a
    pageable buffer, hence no synchronisation with the device's queue.
    """
    return torch.full((), step_seed(seed, step, micro_step, rank), dtype=torch.int64, device=device)
