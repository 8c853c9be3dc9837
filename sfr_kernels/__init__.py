"""Fused Triton kernels for Semantic Flow Regularization, with their pure-PyTorch reference.

Depends only on torch (and triton for the fused path); the user-facing library is ``sfr``.
"""
from sfr_kernels import philox
from sfr_kernels.loss import sfr_loss, triton_runs_on
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
    "sfr_loss_reference",
    "triton_runs_on",
    "philox",
    "draw_source",
    "draw_time",
    "flow_path",
    "timestep_features",
    "timestep_frequencies",
]
