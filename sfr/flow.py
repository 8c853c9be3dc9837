"""Sampling the flow: solve the head's ODE from source draws to the future-embedding distribution.

A trained :class:`~sfr.head.FlowHead` is a velocity field ``v(x_s, s, h)`` on the conditional OT path
``x_s = (1 - s) x0 + s y`` (``x0`` a source draw, ``y`` a target embedding). Solving

    dx/ds = v(x, s, h),    x(0) = x_init ~ N(0, sigma^2 I_E),    s from 0 to 1

carries source draws to samples of the distribution of future embeddings that the head learned for
the hidden state ``h``. This is what ``flow_matching``'s ``ODESolver(velocity_model).sample(x_init,
step_size=1 / num_steps, method=...)`` does with a fixed step (its ``euler`` and ``midpoint``
methods), with the head's conditioning ``c = W_c h`` computed once per anchor.
"""
from __future__ import annotations

import torch

ODE_METHODS = ("euler", "midpoint")


@torch.no_grad()
def sample_flow(head, h: torch.Tensor, x_init: torch.Tensor, num_steps: int = 16,
                method: str = "midpoint") -> torch.Tensor:
    """``x(1)``: solve ``dx/ds = head(x, s, h)`` from ``x(0) = x_init`` with ``num_steps`` fixed steps of ``method``.

    h [N, D], x_init [N, S, E] -> [N, S, E] (S draws per anchor). ``euler``: ``x += ds v(x, s)``;
    ``midpoint``: ``x += ds v(x + ds/2 v(x, s), s + ds/2)``, with ``ds = 1 / num_steps``.
    """
    from sfr.checks import check_int

    if method not in ODE_METHODS:
        raise ValueError(f"method must be one of {ODE_METHODS}, got {method!r}")
    check_int("num_steps", num_steps)
    c = head.condition(h.to(x_init.dtype)).unsqueeze(1)  # [N, 1, Hd], shared by the S draws
    x, ds = x_init, 1.0 / num_steps
    s = torch.zeros(x_init.shape[:-1], dtype=x_init.dtype, device=x_init.device)
    for _ in range(num_steps):
        v = head.velocity(x, s, c)
        if method == "midpoint":
            v = head.velocity(x + 0.5 * ds * v, s + 0.5 * ds, c)
        x, s = x + ds * v, s + ds
    return x
