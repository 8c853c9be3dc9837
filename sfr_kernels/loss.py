"""``sfr_loss``: the public entry point, validating its arguments and dispatching on ``backend``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sfr_kernels.reference import sfr_loss_reference
from sfr_kernels.validation import check_sfr_inputs


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run for tensors on ``device``.

    On CUDA always; on the CPU only under ``TRITON_INTERPRET=1`` (how CI tests the kernels).
    """
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class LossPath:
    """Which implementation computes an :func:`sfr_loss` call, and why the fused one does not.

    ``backend``: ``"triton"`` (the fused kernels) or ``"torch"`` (the PyTorch reference).
    ``fallback_reason``: None, or why the reference runs where the kernels were asked for (``backend=
    "triton"``, or ``"auto"`` with CUDA tensors): an unsupported head, hooks on its layers, gradients
    with respect to the targets, ... ``backend="torch"`` and ``"auto"`` on the CPU are choices, not fallbacks.
    """

    backend: str
    fallback_reason: str | None = None


def loss_path(hidden, target, head, *, backend="auto", noise=None, time=None, weight=None) -> LossPath:
    """The :class:`LossPath` that :func:`sfr_loss` takes for these arguments (tensor metadata only).

    ``backend="triton"`` on the CPU without ``TRITON_INTERPRET=1`` is an error of :func:`sfr_loss`, not
    a path: it is reported as ``"triton"`` here.
    """
    if backend == "auto":
        backend = "triton" if hidden.device.type == "cuda" else "torch"
    if backend == "torch":
        return LossPath("torch")
    from sfr_kernels.head_support import fused_path_reason  # no triton needed to decide

    reason = fused_path_reason(target, head, noise=noise, time=time, weight=weight)
    return LossPath("torch", reason) if reason is not None else LossPath("triton")


def sfr_loss(hidden, target, head, *, anchor_index=None, num_samples=1, source_std=1.0,
             time_sampling="uniform", seed=0, noise=None, time=None, weight=None, grad_scale=1.0,
             reduction="mean", backend="auto", time_mean=0.0, time_std=1.0, anchor_offset=0):
    """Semantic Flow Regularization loss (conditional flow matching of future embeddings).

    ``l_a = 1/(M E) sum_m ||head(x_s, s, h_a) - (y_a - x0)||^2`` with ``x_s = (1-s) x0 + s y_a``,
    ``x0 ~ N(0, source_std^2 I)`` and ``s ~ time_sampling``, reduced over anchors by ``reduction``
    (``mean``: ``sum w l / sum w``, 0 for no anchors; ``sum``: ``sum w l``).

    Args:
        hidden: ``[N, D]`` anchor states, or ``[B, T, D]`` / ``[B*T, D]`` with ``anchor_index``.
        target: ``[N, E]`` target embeddings ``y``.
        head: the flow head (``sfr.FlowHead``): ``head(x_s [N,M,E], s [N,M], h [N,D]) -> [N,M,E]``.
        anchor_index: int64 ``[N]`` flat positions ``b*T + t`` into ``hidden``.
        num_samples: ``M`` source/time draws per anchor.
        source_std: ``sigma`` of the Gaussian source (0: deterministic source).
        time_sampling: ``"uniform"`` | ``"logit_normal"`` (``sigmoid(time_mean + time_std z)``) | ``"zero"``.
        seed: int or 0-dim int64 tensor; draws follow docs/design.md, "Random draws (Philox layout)".
        anchor_offset: int or 0-dim int64 tensor ``o >= 0`` (default 0): anchor ``a`` of this call draws
            what anchor ``o + a`` of the layout draws. Data-parallel ranks that pass the number of anchors
            on the ranks before them (and the same seed) draw exactly what one process draws for the
            whole batch.
        noise, time: explicit ``x0 [N, M, E]`` (used as is) and ``s [N, M]``, overriding the draws.
        weight: non-negative per-anchor weights ``[N]``.
        grad_scale: ``lambda``: the gradient into ``hidden`` is multiplied by it; 0 = none at all.
        backend: ``"auto"`` (Triton on CUDA, reference elsewhere), ``"triton"`` or ``"torch"``. Which one
            ran, and why the kernels did not: :func:`loss_path` with the same arguments.

    Returns:
        0-dim float32 loss (float64 for a float64 head).
    """
    check_sfr_inputs(hidden, target, head, anchor_index=anchor_index, num_samples=num_samples,
                     source_std=source_std, time_sampling=time_sampling, seed=seed, noise=noise,
                     time=time, weight=weight, grad_scale=grad_scale, reduction=reduction,
                     backend=backend, time_mean=time_mean, time_std=time_std, anchor_offset=anchor_offset)
    kwargs = dict(anchor_index=anchor_index, num_samples=num_samples, source_std=source_std,
                  time_sampling=time_sampling, seed=seed, noise=noise, time=time, weight=weight,
                  grad_scale=grad_scale, reduction=reduction, time_mean=time_mean, time_std=time_std,
                  anchor_offset=anchor_offset)
    if backend == "auto":
        backend = "triton" if hidden.device.type == "cuda" else "torch"
    if backend == "torch":
        return sfr_loss_reference(hidden, target, head, **kwargs)
    if not triton_runs_on(hidden.device):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {hidden.device}); on the CPU the kernels run "
            "only under the Triton interpreter (set TRITON_INTERPRET=1 before importing sfr_kernels). "
            "Use backend='torch' for the reference implementation."
        )
    from sfr_kernels.fused_loss import sfr_loss_triton  # imported lazily: needs triton

    return sfr_loss_triton(hidden, target, head, **kwargs)
