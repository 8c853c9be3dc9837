"""The head's weights under sharding engines (FSDP1, FSDP2, DeepSpeed ZeRO-3) for the fused loss.

The fused op reads the head's weight tensors directly instead of calling its layers, so it must run
where the engine has gathered them. It therefore runs *inside the head's own call*
(:func:`call_inside`): ``head(*inputs)`` with its ``forward`` replaced, for that one call, by the loss.
The engine's hooks then do what they do for any module: gather the weights before, free them after,
gather them again for the backward, and reduce-scatter the gradients the op gives its weights.

* **FSDP2** (``fully_shard``): a head inside an outer sharded module has its parameters unsharded for
  that module's whole forward (nothing to do); a head sharded on its own (an ``FSDPModule``) is
  unsharded by its pre-forward hook. A *layer* of the head sharded on its own would be gathered only
  by its own call, which the fused op never makes: that head falls back to the reference.
* **FSDP1** (``FullyShardedDataParallel``, ``use_orig_params`` or not): the wrapper's forward unshards
  the flat parameter and exposes the original parameters as views of it; the loss runs as the
  wrapped FlowHead's forward.
* **DeepSpeed ZeRO-3**: each module's hook gathers only its *own* parameters, so the head's layers'
  parameters are registered as external parameters of the head
  (``deepspeed.zero.register_external_parameter``): gathered at the head's call and for its backward,
  released after; ZeRO's per-parameter hooks reduce-scatter their gradients.

Depends only on torch (deepspeed is imported only when the head's parameters are ZeRO-3 parameters).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return None
    return FullyShardedDataParallel


def _fsdp2_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def inner_head(head: nn.Module) -> nn.Module:
    """The FlowHead itself: ``head``, or the module an FSDP1 wrapper wraps (FSDP2 and ZeRO-3 keep the
    module and change only its parameters and hooks)."""
    fsdp1 = _fsdp1_class()
    while fsdp1 is not None and isinstance(head, fsdp1):
        head = head.module
    return head


def zero3_managed(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``module``'s parameters (they carry a ``ds_id``)."""
    return any(hasattr(param, "ds_id") for param in module.parameters())


def engine_name(head: nn.Module) -> str | None:
    """``"fsdp1"``, ``"fsdp2"`` or ``"deepspeed"`` when an engine shards the head itself, else None.

    None also for a head that is part of a larger FSDP module: its weights are whole during that
    module's forward, so the op can read them without a call of its own.
    """
    fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
    if fsdp1 is not None and isinstance(head, fsdp1):
        return "fsdp1"
    if fsdp2 is not None and isinstance(head, fsdp2):
        return "fsdp2"
    if zero3_managed(head):
        return "deepspeed"
    return None


def bypassed_hooks_reason(head: nn.Module) -> str | None:
    """Why hooks on the head's *layers* keep the fused op from seeing what their calls would, or None.

    The op never calls the layers, so their hooks would not run. DeepSpeed ZeRO-3 hooks every module;
    under it the head's call gathers the layers' parameters instead (see the module doc), so its layer
    hooks are not needed. Hooks on the head itself run: the op computes inside the head's call.
    """
    fsdp2 = _fsdp2_class()
    zero3 = zero3_managed(head)
    for name, module in inner_head(head).named_modules():
        if not name:
            continue  # the head itself
        if fsdp2 is not None and isinstance(module, fsdp2):
            return f"head.{name} is sharded on its own (fully_shard): only its own call would gather its weights"
        if (module._forward_hooks or module._forward_pre_hooks) and not zero3:
            return f"head.{name} has forward hooks, which the fused kernels would bypass"
    return None


def runs_in_call(head: nn.Module) -> bool:
    """Whether the loss must run inside the head's call: an engine shards it, or it has hooks of its own."""
    inner = inner_head(head)
    return engine_name(head) is not None or bool(inner._forward_hooks or inner._forward_pre_hooks)


def _register_zero3_external_parameters(head: nn.Module) -> None:
    """Make the head's call gather every parameter of its layers (once per head)."""
    if getattr(head, "_sfr_zero3_external", False):
        return
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for param in head.parameters():
        register_external_parameter(head, param)
    head._sfr_zero3_external = True


def call_inside(head: nn.Module, loss: Callable[..., torch.Tensor], *inputs) -> torch.Tensor:
    """``loss(*inputs)`` computed as the forward of ``head``'s call, so every hook of the call runs.

    ``inputs`` are the tensors the loss reads (passed through the call, so engines that cast or move
    a module's inputs do that to them too; None entries are kept). The instance attribute ``forward``
    shadows the class's method for this call only and is removed afterwards, also on error.
    """
    inner = inner_head(head)
    if zero3_managed(inner):
        _register_zero3_external_parameters(inner)
    if "forward" in vars(inner):
        raise RuntimeError("sfr_loss: the head's forward is already replaced on the instance (a nested call?)")
    inner.forward = loss
    try:
        return head(*inputs)
    finally:
        del inner.forward
