"""Which heads the fused kernels implement, and the weights they are given.

The kernels compute the default "mlp" ``FlowHead`` (``sfr.head``) exactly; any other head -- another
kind, a subclass overriding its forward path, hooks on its layers, extra parameters such as adapters,
float64 -- is computed by the PyTorch reference instead, with a one-time warning naming the reason.
A head sharded by FSDP1, FSDP2 or DeepSpeed ZeRO-3 is supported: the loss then runs inside the head's
call, where the engine has gathered its weights (:mod:`sfr_kernels.sharding`).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from sfr_kernels.sharding import bypassed_hooks_reason, inner_head

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_warned: set[str] = set()  # fallback reasons already announced


def warn_fallback_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"sfr_loss(backend='triton'): {reason}; falling back to the PyTorch reference "
                      "(this warning is shown once)", stacklevel=4)


def _is_linear(module, bias: bool) -> bool:
    return type(module) is nn.Linear and (module.bias is not None) == bias


def head_weights(head: nn.Module) -> list[torch.Tensor]:
    """The weight tensors the kernels read, in the op's order: ``W_c, b_c, W_x, W_t, W_o, b_o, *W_k, *b_k``.

    Read through the layers' attributes, not ``head.parameters()``: inside an FSDP1 unit's forward they
    are views of the unsharded flat parameter (plain tensors), which ``parameters()`` may not list.
    """
    head = inner_head(head)
    layers = list(head.hidden_layers)
    return [head.cond.weight, head.cond.bias, head.in_x.weight, head.in_t.weight, head.out.weight, head.out.bias,
            *[layer.weight for layer in layers], *[layer.bias for layer in layers]]


def unsupported_head_reason(head: nn.Module) -> str | None:
    """Why the fused kernels cannot compute ``head`` exactly, or None when they can.

    The kernels implement the default "mlp" ``FlowHead`` structure (see ``sfr.head``): ``cond``
    (Linear D->Hd, bias), ``in_x`` (Linear E->Hd), ``in_t`` (Linear F->Hd), ``hidden_layers``
    (Linear Hd->Hd, bias), ``out`` (Linear Hd->E, bias), SiLU activations, a buffer
    ``time_frequencies`` [F/2] (float32, or the head's dtype after ``head.to(dtype)``). Anything else
    (another kind, a subclass overriding the forward path, hooks on its layers, extra parameters such
    as adapters, float64) goes to the reference. An FSDP1 wrapper is looked through, and hooks on the
    head itself are fine (the loss runs inside its call). Shapes are read from the layers' sizes, not
    from their weights, which an engine may hold sharded outside the head's call.
    """
    head = inner_head(head)
    kind = getattr(head, "kind", None)
    if kind != "mlp":
        return f"head kind {kind!r} is not 'mlp'"
    cls = type(head)
    defining = next(c for c in cls.__mro__ if "kind" in vars(c))
    for name in ("forward", "velocity", "condition"):
        if getattr(cls, name, None) is not getattr(defining, name, None):
            return f"{cls.__name__} overrides {name}()"
    try:
        cond, in_x, in_t, out = head.cond, head.in_x, head.in_t, head.out
        layers = list(head.hidden_layers)
        freq = head.time_frequencies
        weights = head_weights(head)
    except AttributeError as err:
        return f"unexpected head structure ({err})"
    bypassed = bypassed_hooks_reason(head)  # before the layer types: FSDP2 changes a sharded layer's class
    if bypassed is not None:
        return bypassed
    if not (_is_linear(cond, True) and _is_linear(in_x, False) and _is_linear(in_t, False)
            and _is_linear(out, True) and all(_is_linear(layer, True) for layer in layers)):
        return "head layers are not plain nn.Linear modules of the FlowHead layout"
    width, num_features = cond.out_features, in_t.in_features
    if not (in_x.out_features == in_t.out_features == out.in_features == width
            and in_x.in_features == out.out_features == head.embed_dim
            and cond.in_features == head.hidden_size
            and all(layer.in_features == layer.out_features == width for layer in layers)):
        return "head layer shapes do not chain as in FlowHead"
    if (not isinstance(freq, torch.Tensor) or freq.dtype not in KERNEL_DTYPES or num_features % 2
            or tuple(freq.shape) != (num_features // 2,)):
        return "head.time_frequencies is not a floating [time_features / 2] buffer"
    if not all(isinstance(w, torch.Tensor) for w in weights):
        return "head layers lack a weight or bias tensor"
    if any(all(p is not w for w in weights) for p in head.parameters()):
        return "head has parameters outside the FlowHead layout"
    dtypes = {w.dtype for w in weights}
    if len(dtypes) != 1 or weights[0].dtype not in KERNEL_DTYPES:
        return f"head parameter dtypes {sorted(map(str, dtypes))} are not one of float32/bfloat16/float16"
    if freq.device != weights[0].device:
        return "head.time_frequencies is on another device than the parameters"
    if weights[0].dtype != torch.float32 and freq.dtype == torch.float32:
        # The kernels read float32 frequencies with 16-bit weights as autocast (s not rounded).
        return "a 16-bit head with float32 time_frequencies (head.to(dtype) rounds them)"
    return None


def fused_path_reason(target, head, *, noise=None, time=None, weight=None) -> str | None:
    """Why the fused kernels cannot compute this call (the reference does), or None when they can."""
    reason = unsupported_head_reason(head)
    if reason is None and any(t is not None and t.requires_grad for t in (target, noise, time, weight)):
        reason = "gradients with respect to target/noise/time/weight are not implemented by the kernels"
    return reason


def no_autocast(device: torch.device):
    """The op computes in the dtype of the weights it is given: the cuBLAS calls inside it must not be
    autocast (their outputs feed kernels and buffers typed by that dtype). Autocast itself is applied
    outside the op, by :func:`weights_for_autocast`."""
    return torch.autocast(device_type=device.type, enabled=False)


def weights_for_autocast(weights: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``weights`` as an autocast region would use them: in its dtype (16-bit tensor-core matmuls)
    where they are float32, else unchanged.

    This is what the reference's ``nn.Linear`` layers do under autocast, so e.g. a float32 head trained
    with ``--bf16`` runs the bfloat16 kernels instead of float32 ones. The casts are differentiable:
    the float32 parameters get float32 gradients. (Time frequencies are not matmul weights: they stay
    float32, as in the reference.)
    """
    if not torch.is_autocast_enabled(device.type):
        return weights
    dtype = torch.get_autocast_dtype(device.type)
    return [w.to(dtype) if w.dtype == torch.float32 else w for w in weights]
