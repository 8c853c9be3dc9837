"""Pure-PyTorch reference of the SFR objective: the single source of truth for the math.

For anchors ``a = 0..N-1`` with hidden state ``h_a`` [D] and target ``y_a`` [E], and samples
``m = 0..M-1``::

    x0[a,m]  = source_std * randn(seed, ((o+a)*M + m)*E + j)    j = 0..E-1   (or explicit noise)
    s[a,m]   ~ p(s) from stream seed + 1 at offset (o+a)*M + m    (or explicit time)
    x_s      = (1 - s) * x0 + s * y_a                             conditional OT path
    u        = y_a - x0                                           target velocity
    l_a      = 1/(M*E) * sum_m || v(x_s, s, h_a) - u ||^2
    mean:  L = sum_a w_a l_a / sum_a w_a   (0 when sum_a w_a == 0, e.g. no anchors)
    sum:   L = sum_a w_a l_a

``o = anchor_offset`` (default 0) places this call's anchors after ``o`` anchors of the draw layout:
the ranks of a data-parallel step, each passing the anchors of the ranks before it, draw exactly what
one process draws for the whole batch. The backbone receives ``grad_scale * dL/dh`` (``grad_scale = 0``: ``hidden`` is detached, so no
gradient work is done for it); the head always receives its full gradient.
"""
from __future__ import annotations

import math

import torch

from sfr_kernels import philox

TIME_SAMPLINGS = ("uniform", "logit_normal", "zero")
# How the fused kernels name the time source (their TIME_MODE constexpr): a sampling above, or the
# explicit ``time`` argument. The one table the launchers and kernels share.
TIME_MODES = {"explicit": 0, "uniform": 1, "logit_normal": 2, "zero": 3}

# Sinusoidal timestep features: s in [0, 1] is scaled to [0, TIME_SCALE] as in DiT's timestep
# embedder, and the frequencies span TIME_SCALE down to TIME_SCALE / MAX_PERIOD geometrically.
TIME_SCALE = 1000.0
MAX_PERIOD = 10000.0


def timestep_frequencies(num_features: int, device=None) -> torch.Tensor:
    """Angular frequencies ``f_k = TIME_SCALE * MAX_PERIOD**(-k / (F/2))``, k = 0..F/2-1, float32.

    Kept as a buffer by the head and loaded by the kernels, so both evaluate ``cos(f_k s)`` on the
    very same float32 arguments.
    """
    if num_features < 2 or num_features % 2:
        raise ValueError(f"time_features must be an even integer >= 2, got {num_features}")
    half = num_features // 2
    k = torch.arange(half, dtype=torch.float64, device=device)
    return (TIME_SCALE * torch.exp(-math.log(MAX_PERIOD) * k / half)).to(torch.float32)


def timestep_features(s: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """``e_s = [cos(f_0 s), .., cos(f_{F/2-1} s), sin(f_0 s), .., sin(f_{F/2-1} s)]``: [..., F] float32."""
    angles = s.to(torch.float32).unsqueeze(-1) * frequencies
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sample_offsets(num_anchors: int, num_samples: int, device, anchor_offset=0) -> torch.Tensor:
    """Row offsets ``(o + a)*M + m`` of the (anchor, sample) grid in the draw layout: int64 [N, M].

    ``anchor_offset`` ``o``: an int or a 0-dim int64 tensor (used on ``device``, no host sync)."""
    rows = torch.arange(num_anchors * num_samples, dtype=torch.int64, device=device).view(num_anchors, num_samples)
    if isinstance(anchor_offset, torch.Tensor):
        if anchor_offset.device == rows.device:
            return rows + anchor_offset * num_samples
        anchor_offset = int(anchor_offset)  # a CPU tensor: read on the host, no copy to the device
    return rows + anchor_offset * num_samples if anchor_offset else rows


def draw_source(seed, num_anchors: int, num_samples: int, embed_dim: int, source_std: float, device,
                anchor_offset=0):
    """``x0[a,m,j] = source_std * randn(seed, ((o + a)*M + m)*E + j)``: float32 [N, M, E]."""
    rows = sample_offsets(num_anchors, num_samples, device, anchor_offset)
    offsets = rows.unsqueeze(-1) * embed_dim + torch.arange(embed_dim, dtype=torch.int64, device=device)
    return source_std * philox.randn(seed, offsets)


def draw_time(seed, num_anchors: int, num_samples: int, time_sampling: str, device,
              time_mean: float = 0.0, time_std: float = 1.0, anchor_offset=0) -> torch.Tensor:
    """Flow time ``s[a,m]`` from the stream ``seed + 1`` at offset ``(o + a)*M + m``: float32 [N, M].

    uniform: ``rand``; logit_normal: ``sigmoid(time_mean + time_std * randn)``; zero: 0.
    """
    rows = sample_offsets(num_anchors, num_samples, device, anchor_offset)
    if time_sampling == "uniform":
        return philox.rand(seed + 1, rows)
    if time_sampling == "logit_normal":
        return torch.sigmoid(time_mean + time_std * philox.randn(seed + 1, rows))
    if time_sampling == "zero":
        return torch.zeros(rows.shape, dtype=torch.float32, device=device)
    raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")


def flow_path(x0: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional OT path: ``x_s = (1 - s) x0 + s y`` and target velocity ``u = y - x0``.

    x0 [N, M, E], y [N, E] (broadcast over M), s [N, M].
    """
    y = y.unsqueeze(1)
    s = s.unsqueeze(-1)
    return (1 - s) * x0 + s * y, y - x0


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` (the SFR weight lambda)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def route_gradient(h: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """``h`` whose gradient is scaled by ``grad_scale``; detached (no gradient work) at 0."""
    if grad_scale == 0:
        return h.detach()
    if grad_scale == 1:
        return h
    return _ScaleGrad.apply(h, grad_scale)


def reduce_anchor_losses(per_anchor: torch.Tensor, weight: torch.Tensor | None, reduction: str):
    """Weighted reduction of per-anchor losses ``l_a`` [N] to a 0-dim tensor (see module doc).

    No host sync: the count of an unweighted mean is a Python number (no host-to-device copy), and an
    empty (or all-zero-weight) anchor set gives ``total == 0``, divided by 1 on the device.
    """
    if weight is None:
        total = per_anchor.sum()
        return total if reduction == "sum" else total / max(per_anchor.numel(), 1)
    weight = weight.to(per_anchor.dtype)
    total = (weight * per_anchor).sum()
    if reduction == "sum":
        return total
    count = weight.sum()
    return total / torch.where(count > 0, count, torch.ones_like(count))


def sfr_loss_reference(hidden, target, head, *, anchor_index=None, num_samples=1, source_std=1.0,
                       time_sampling="uniform", seed=0, noise=None, time=None, weight=None,
                       grad_scale=1.0, reduction="mean", time_mean=0.0, time_std=1.0, anchor_offset=0):
    """The SFR loss in plain PyTorch; arguments as :func:`sfr_kernels.sfr_loss` (already validated).

    The head runs in its parameters' dtype (bf16 hidden states with an fp32 head are upcast); the
    squared error and the reduction are accumulated in float32 (float64 for float64 inputs).
    """
    param = next(head.parameters())
    compute_dtype = param.dtype
    loss_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32

    h = hidden.reshape(-1, hidden.shape[-1])
    if anchor_index is not None:
        h = h.index_select(0, anchor_index)
    h = route_gradient(h, grad_scale).to(compute_dtype)
    n, m, e = h.shape[0], num_samples, target.shape[-1]

    x0 = noise if noise is not None else draw_source(seed, n, m, e, source_std, h.device, anchor_offset)
    s = time if time is not None else draw_time(seed, n, m, time_sampling, h.device, time_mean, time_std,
                                                anchor_offset)
    y = target.to(loss_dtype)
    x_s, u = flow_path(x0.to(loss_dtype), y, s.to(loss_dtype))

    v = head(x_s.to(compute_dtype), s.to(compute_dtype), h)  # [N, M, E]
    per_anchor = (v.to(loss_dtype) - u).square().mean(dim=(1, 2))  # l_a, [N]
    return reduce_anchor_losses(per_anchor, weight, reduction)
