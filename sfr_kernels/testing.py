"""Comparing the fused path with the reference: the one helper the test suite and ``bench/check_gpu.py`` share."""
from __future__ import annotations

import torch

from sfr_kernels.head_support import unsupported_head_reason
from sfr_kernels.loss import sfr_loss


def loss_and_grads(backend: str, hidden: torch.Tensor, target: torch.Tensor, head: torch.nn.Module,
                   loss_scale: float = 1.0, **kwargs) -> tuple[torch.Tensor, dict]:
    """``(loss, grads)`` of ``sfr_loss(..., backend=backend, **kwargs)``, back-propagated from ``loss * loss_scale``.

    ``grads`` maps ``"hidden"`` and every head parameter name to its ``.grad`` (None where none reached
    it), as autograd left it (scaled by ``loss_scale``). ``hidden`` is cloned, so the caller's tensor is
    untouched. ``backend="triton"`` with a head the kernels do not implement raises: the reference
    would then be compared with itself.
    """
    if backend == "triton" and unsupported_head_reason(head) is not None:
        raise AssertionError(f"the fused path would fall back to the reference: {unsupported_head_reason(head)}")
    hidden = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss = sfr_loss(hidden, target, head, backend=backend, **kwargs)
    (loss * loss_scale).backward()
    grads = {"hidden": hidden.grad}
    grads.update({name: p.grad for name, p in head.named_parameters()})
    return loss.detach(), grads
