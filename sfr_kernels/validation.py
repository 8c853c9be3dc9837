"""Argument checks for :func:`sfr_kernels.sfr_loss`.

Every check reads tensor metadata only (shape, dtype, device), never values on an accelerator,
so validation costs no device sync on the hot path. Value checks (index bounds, non-negative
weights) run only for CPU tensors, where they are free of syncs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sfr_kernels.reference import TIME_SAMPLINGS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum")
BACKENDS = ("auto", "triton", "torch")
MAX_SEED = 2**63 - 2  # the time stream uses seed + 1, which must still fit in int64


@dataclass(frozen=True)
class LossShape:
    """The size of one SFR loss: ``N`` anchors, ``M`` samples each, hidden size ``D``, embedding size ``E``,
    and the head's ``width`` (Hd), ``depth`` and ``time_features`` (F) -- the default head's unless given."""

    N: int
    M: int
    D: int
    E: int
    width: int = 1024
    depth: int = 2
    time_features: int = 64

    def head_params(self) -> int:
        """P: ``W_c, b_c`` (D·Hd + Hd), ``W_x`` (E·Hd), ``W_t`` (F·Hd), hidden (Hd² + Hd)·(depth-1), ``W_o, b_o`` (Hd·E + E)."""
        hd, layers = self.width, self.depth - 1
        return (self.D * hd + hd) + self.E * hd + self.time_features * hd + (hd * hd + hd) * layers + (hd * self.E + self.E)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _require_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of hidden), got {t.device}")


def _require_number(name: str, value, *, minimum: float | None = None, integer: bool = False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # ints are finite (and may be symbolic under compile)
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _require_draw_integer(name: str, value, device: torch.device, maximum: int | None = None) -> None:
    """``value`` is an int >= 0 (at most ``maximum``) or a 0-dim int64 tensor on ``device`` or the CPU
    (its value is not read here: that would sync with the device)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype != torch.int64:
            raise TypeError(f"{name} tensor must be a 0-dim int64 tensor, got {_describe(value)}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} tensor must be on {device} (or the CPU), got {value.device}")
        return
    _require_number(name, value, minimum=0, integer=True)
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_sfr_inputs(hidden, target, head, *, anchor_index, num_samples, source_std, time_sampling,
                     seed, noise, time, weight, grad_scale, reduction, backend, time_mean,
                     time_std, anchor_offset=0) -> LossShape:
    """Raise ``TypeError``/``ValueError`` naming the offending argument; return the problem size."""
    hidden = _require_tensor("hidden", hidden)
    target = _require_tensor("target", target)
    _require_float("hidden", hidden)
    _require_float("target", target)
    device = hidden.device

    if not isinstance(head, torch.nn.Module) or not hasattr(head, "hidden_size") or not hasattr(head, "embed_dim"):
        raise TypeError(
            "head must be an nn.Module with hidden_size and embed_dim attributes (e.g. sfr.FlowHead), "
            f"got {type(head).__name__}"
        )
    params = list(head.parameters())
    if not params:
        raise ValueError("head has no parameters")
    if params[0].device != device:
        raise ValueError(f"head parameters must be on {device} (the device of hidden), got {params[0].device}")
    d, e = int(head.hidden_size), int(head.embed_dim)

    if anchor_index is None:
        if hidden.dim() != 2:
            raise ValueError(
                f"hidden must be [N, D] when anchor_index is None (pass anchor_index to gather from "
                f"[B, T, D] or [B*T, D]), got {_describe(hidden)}"
            )
        n = hidden.shape[0]
    else:
        anchor_index = _require_tensor("anchor_index", anchor_index)
        if hidden.dim() not in (2, 3):
            raise ValueError(f"hidden must be [B, T, D] or [B*T, D] with anchor_index, got {_describe(hidden)}")
        if anchor_index.dtype != torch.int64:
            raise TypeError(f"anchor_index must be an int64 (Long) tensor, got {anchor_index.dtype}")
        if anchor_index.dim() != 1:
            raise ValueError(f"anchor_index must be 1-D [N], got {_describe(anchor_index)}")
        _require_device("anchor_index", anchor_index, device)
        n = anchor_index.shape[0]
        rows = hidden.numel() // max(hidden.shape[-1], 1)
        # Values are checked only where that costs no device sync and no graph break (eager, CPU tensors).
        if anchor_index.device.type == "cpu" and n > 0 and not torch.compiler.is_compiling():
            lo, hi = int(anchor_index.min()), int(anchor_index.max())
            if lo < 0 or hi >= rows:
                raise ValueError(
                    f"anchor_index values must lie in [0, {rows}) (flat positions b*T + t into hidden), "
                    f"got values in [{lo}, {hi}]"
                )
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden must have last dimension {d} (head.hidden_size), got {_describe(hidden)}")

    if target.dim() != 2 or target.shape[0] != n or target.shape[1] != e:
        raise ValueError(f"target must be [N, E] = [{n}, {e}] (E = head.embed_dim), got {_describe(target)}")
    _require_device("target", target, device)

    _require_number("num_samples", num_samples, minimum=1, integer=True)
    _require_number("source_std", source_std, minimum=0.0)
    _require_number("grad_scale", grad_scale, minimum=0.0)
    _require_number("time_mean", time_mean)
    _require_number("time_std", time_std, minimum=0.0)
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    _require_draw_integer("seed", seed, device, MAX_SEED)
    _require_draw_integer("anchor_offset", anchor_offset, device)

    m = num_samples
    if not isinstance(anchor_offset, torch.Tensor) and (anchor_offset + n) * m * e >= 2**63:
        # the draws' Philox offsets ((o + a)*M + m)*E + j must fit in int64 (a tensor offset is not read here)
        raise ValueError(f"anchor_offset {anchor_offset} puts the draw offsets ((o + N)*M*E) beyond int64")
    if noise is not None:
        noise = _require_tensor("noise", noise)
        _require_float("noise", noise)
        if tuple(noise.shape) != (n, m, e):
            raise ValueError(f"noise must be [N, M, E] = [{n}, {m}, {e}], got {_describe(noise)}")
        _require_device("noise", noise, device)
    if time is not None:
        time = _require_tensor("time", time)
        _require_float("time", time)
        if tuple(time.shape) != (n, m):
            raise ValueError(f"time must be [N, M] = [{n}, {m}], got {_describe(time)}")
        _require_device("time", time, device)
    if weight is not None:
        weight = _require_tensor("weight", weight)
        _require_float("weight", weight)
        if tuple(weight.shape) != (n,):
            raise ValueError(f"weight must be [N] = [{n}], got {_describe(weight)}")
        _require_device("weight", weight, device)
        if weight.device.type == "cpu" and n > 0 and bool((weight < 0).any()):
            raise ValueError("weight must be non-negative")
    head_dims = {k: getattr(head, k) for k in ("width", "depth", "time_features") if isinstance(getattr(head, k, None), int)}
    return LossShape(N=n, M=m, D=d, E=e, **head_dims)
