"""Which heads the fused kernels implement, and the weights they are given.

The kernels compute the default "mlp" ``FlowHead`` (``sfr.head``) exactly; any other head -- another
kind, a subclass overriding its forward path, hooks, extra parameters such as adapters, float64 -- is
computed by the PyTorch reference instead, with a one-time warning naming the reason.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_warned: set[str] = set()  # fallback reasons already announced


def warn_fallback_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"sfr_loss(backend='triton'): {reason}; falling back to the PyTorch reference "
                      "(this warning is shown once)", stacklevel=4)


def _is_linear(module, bias: bool) -> bool:
    return type(module) is nn.Linear and (module.bias is not None) == bias


def unsupported_head_reason(head: nn.Module) -> str | None:
    """Why the fused kernels cannot compute ``head`` exactly, or None when they can.

    The kernels implement the default "mlp" ``FlowHead`` structure (see ``sfr.head``): ``cond``
    (Linear D->Hd, bias), ``in_x`` (Linear E->Hd), ``in_t`` (Linear F->Hd), ``hidden_layers``
    (Linear Hd->Hd, bias), ``out`` (Linear Hd->E, bias), SiLU activations, a buffer
    ``time_frequencies`` [F/2] (float32, or the head's dtype after ``head.to(dtype)``). Anything else
    (another kind, a subclass overriding the forward path, hooks, extra parameters such as adapters,
    float64) goes to the reference.
    """
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
    except AttributeError as err:
        return f"unexpected head structure ({err})"
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
    params = list(head.parameters())
    if len(params) != 2 * len(layers) + 6:
        return "head has parameters outside the FlowHead layout"
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or params[0].dtype not in KERNEL_DTYPES:
        return f"head parameter dtypes {sorted(map(str, dtypes))} are not one of float32/bfloat16/float16"
    if freq.device != params[0].device:
        return "head.time_frequencies is on another device than the parameters"
    if params[0].dtype != torch.float32 and freq.dtype == torch.float32:
        # The kernels read float32 frequencies with 16-bit weights as autocast (s not rounded).
        return "a 16-bit head with float32 time_frequencies (head.to(dtype) rounds them)"
    for module in head.modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return "head has forward hooks (e.g. FSDP or adapters), which the kernels would bypass"
    return None


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
