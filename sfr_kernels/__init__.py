"""Fused Triton kernels for Semantic Flow Regularization, with their pure-PyTorch reference.

Depends only on torch (and triton for the fused path); the user-facing library is ``sfr``.
"""
from sfr_kernels import philox
from sfr_kernels.loss import LossPath, loss_path, sfr_loss, triton_runs_on
from sfr_kernels.reference import (
    draw_source,
    draw_time,
    flow_path,
    sfr_loss_reference,
    timestep_features,
    timestep_frequencies,
)

__all__ = [
    "sfr_loss",
    "loss_path",
    "LossPath",
    "sfr_loss_reference",
    "triton_runs_on",
    "philox",
    "draw_source",
    "draw_time",
    "flow_path",
    "timestep_features",
    "timestep_frequencies",
    "sfr_loss_triton",
    "unsupported_head_reason",
]

def __getattr__(name):
    # The fused path is imported lazily: defining its @triton.jit kernels needs triton, and on a
    # CPU machine TRITON_INTERPRET must be set before that happens.
    if name == "sfr_loss_triton":
        from sfr_kernels.fused_loss import sfr_loss_triton

        return sfr_loss_triton
    if name == "unsupported_head_reason":
        from sfr_kernels.head_support import unsupported_head_reason

        return unsupported_head_reason
    raise AttributeError(f"module 'sfr_kernels' has no attribute {name!r}")
