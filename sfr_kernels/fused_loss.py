"""Fused Triton SFR loss: launchers, backward, ``torch.library`` ops and the ``sfr_loss`` entry point.

(No ``from __future__ import annotations`` here: torch 2.4's custom_op reads the real annotations.)

Computes exactly :func:`sfr_kernels.reference.sfr_loss_reference` for the default "mlp" head
(``sfr.FlowHead``, DESIGN.md section 1) over R = N*M (anchor, sample) rows ``r = a*M + m``.

Forward:

* ``c = h W_c^T + b_c`` [N, Hd], once per anchor -- cuBLAS (``h`` gathered through anchor_index).
* ``z1 = x_s W_x^T + e_s W_t^T + c[a]`` [R, Hd] -- Triton ``flow_input`` (x0, s, x_s, e_s in registers).
* ``z_{k+1} = silu(z_k) W_k^T + b_k`` [R, Hd] -- cuBLAS.
* ``v = silu(z_L) W_o^T + b_o``, ``row_sq = ||v - u||^2`` [R] and ``g_v = dL/dv`` [R, E] --
  Triton ``flow_output`` (v and u in registers).
* gradient-in-forward: ``dW_o = g_v^T silu(z_L)``, ``db_o = sum_r g_v`` -- cuBLAS / torch.

Backward (everything scaled by the upstream ``grad_loss``, a device scalar):

* ``dz_L = silu'(z_L) * (g_v W_o)``, then down the hidden layers -- cuBLAS (``dW_k``, ``db_k``).
* ``dW_x = dz1^T x_s``, ``dW_t = dz1^T e_s`` -- Triton ``flow_input`` (x_s, e_s regenerated from the
  seed; fixed split-R float32 partials summed in order).
* ``dc = sum_m dz1`` (the M rows of an anchor are contiguous), ``db_c``, ``dW_c = dc^T h`` -- torch.
* ``dh = grad_scale * dc W_c`` [N, D] -- cuBLAS; scattered into ``[B*T, D]`` by the Triton
  ``scatter_rows`` kernel (duplicates summed in a fixed order). Skipped entirely at grad_scale 0.

Kept from forward to backward, per row: ``z_1..z_L`` (L*Hd elements, head dtype) and ``g_v``
(E elements, head dtype); per anchor nothing (``h`` is re-gathered from ``hidden``). Transient:
``row_sq`` (R float32), ``c`` [N, Hd], the activations ``silu(z_k)`` one layer at a time, and in
backward ``dz`` [R, Hd], ``dh`` [N, D] and the [S<=16, Hd, E] partials. Never written: x0, x_s,
u, e_s, v.

Determinism: every reduction is either a torch/cuBLAS reduction with a fixed order or a fixed
split of rows whose partials are summed in order; the anchor scatter sorts the index stably. There
is no float atomic anywhere, so a seed gives bit-identical loss and gradients.
"""
import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import List, Tuple

import torch
import triton
from torch import nn
from torch.nn import functional as F

from sfr_kernels.flow_draws import TIME_EXPLICIT, TIME_LOGIT_NORMAL, TIME_UNIFORM, TIME_ZERO
from sfr_kernels.flow_input import flow_input_forward_kernel, flow_input_weight_grad_kernel
from sfr_kernels.flow_output import flow_output_loss_kernel
from sfr_kernels.reference import reduce_anchor_losses, sfr_loss_reference
from sfr_kernels.scatter_rows import scatter_rows_kernel

_TIME_MODES = {"uniform": TIME_UNIFORM, "logit_normal": TIME_LOGIT_NORMAL, "zero": TIME_ZERO}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEBUG_ENV = "SFR_KERNELS_DEBUG"  # "1": fill kernel outputs with NaN first, so an unwritten element shows


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """``torch.empty``, or a NaN-poisoned buffer in debug mode (catches elements a kernel skips)."""
    if os.environ.get(DEBUG_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Which heads the kernels implement


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
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
    ``time_frequencies`` [F/2] (float32, or the head's dtype after ``head.to(dtype)``). Anything else (another kind, a subclass overriding the forward
    path, hooks, extra parameters such as adapters, float64) goes to the reference.
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


# ---------------------------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True)
class LaunchConfigs:
    """Per-kernel launch configuration: ``BLOCK_*`` constexprs plus ``num_warps``/``num_stages``.

    Each dict is passed as is to ``kernel[grid](..., **config)``; ``compile_check`` compiles the very
    same dicts for sm_90 and reports registers/spills.
    """
    input_forward: dict  # BLOCK_R, BLOCK_H, BLOCK_E, BLOCK_F
    output_loss: dict  # BLOCK_R, BLOCK_E, BLOCK_K
    weight_grad_x: dict  # BLOCK_R, BLOCK_H, BLOCK_C (embedding columns)
    weight_grad_t: dict  # BLOCK_R, BLOCK_H, BLOCK_C (timestep-feature columns)
    scatter: dict  # BLOCK_D
    max_splits: int  # fixed row ranges of the weight-gradient reduction (partials summed in order)


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def launch_configs(width: int, embed: int, features: int, hidden_size: int,
                   dtype: torch.dtype = torch.bfloat16) -> LaunchConfigs:
    """Tile sizes for a head of this size and parameter ``dtype``.

    Interpreter: large tiles (its cost grows with the number of programs and loop steps). GPU
    (H100/H200): chosen with ``python -m sfr_kernels.compile_check`` under Triton 3.6 and 3.9 so that
    the seeded kernels do not spill registers for bf16/fp16/fp32 (the explicit-noise output kernel
    may spill a few dozen bytes) -- the in-register Philox draws are register-hungry, so the tiles
    that generate them stay at <= 8-16 draws per thread (8 warps). float32 heads (``tl.dot`` without
    tensor cores unless TF32 is allowed) need half the rows per step in both input weight gradients.
    ``tl.dot`` needs every dimension >= 16, hence the lower bounds. Performance of these tiles has
    not been measured yet (no GPU so far): ``bench.loss`` is the judge.
    """
    if _interpreting():
        w, e = _pow2(width, 16, 128), _pow2(embed, 16, 128)
        f = _pow2(features, 16, 64)
        one = dict(num_warps=4, num_stages=1)
        return LaunchConfigs(
            input_forward=dict(BLOCK_R=64, BLOCK_H=w, BLOCK_E=e, BLOCK_F=f, **one),
            output_loss=dict(BLOCK_R=64, BLOCK_E=e, BLOCK_K=w, **one),
            weight_grad_x=dict(BLOCK_R=64, BLOCK_H=w, BLOCK_C=e, **one),
            weight_grad_t=dict(BLOCK_R=64, BLOCK_H=w, BLOCK_C=f, **one),
            scatter=dict(BLOCK_D=_pow2(hidden_size, 16, 1024), num_warps=4),
            max_splits=2)
    f = _pow2(features, 16, 32)
    return LaunchConfigs(
        input_forward=dict(BLOCK_R=64, BLOCK_H=128, BLOCK_E=32, BLOCK_F=f, num_warps=8, num_stages=3),
        output_loss=dict(BLOCK_R=32, BLOCK_E=64, BLOCK_K=32, num_warps=8, num_stages=3),
        weight_grad_x=dict(BLOCK_R=16 if dtype == torch.float32 else 32, BLOCK_H=64, BLOCK_C=64, num_warps=8,
                           num_stages=3),
        weight_grad_t=dict(BLOCK_R=16 if dtype == torch.float32 else 32, BLOCK_H=64, BLOCK_C=_pow2(features, 16, 64),
                           num_warps=8, num_stages=3),
        scatter=dict(BLOCK_D=256, num_warps=4),
        max_splits=16)


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision. 16-bit heads: tensor cores (the setting only matters for float32).
    float32 heads follow torch's own matmul setting, so the kernels round like the cuBLAS GEMMs around
    them: exact products ("ieee") by default, TF32 after ``torch.set_float32_matmul_precision("high")``.
    """
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if _fp32_matmul_uses_tf32() else "ieee"


def _fp32_matmul_uses_tf32() -> bool:
    """Whether torch's float32 CUDA matmuls use TF32, under either of torch's precision APIs.

    torch >= 2.9 raises on reading ``matmul.allow_tf32`` once the new API
    (``torch.backends.fp32_precision = "tf32"``, which transformers' ``--tf32`` sets) has been used;
    ``matmul.fp32_precision`` reflects both APIs and never raises ("none" = the global setting).
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9: only the legacy flag exists
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def _gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the gradients formed in the forward (``g_v``, ``dW_o``, ``db_o``) for a head of ``dtype``.

    They are formed before the incoming gradient ``g`` (e.g. fp16 loss scaling's 2**16) is known:
    ``g_v = 2 coef (v - u)`` with ``coef ~ 1 / (M E N)`` (~1e-8) lies below float16's normal range
    (6e-5), so float16 heads keep them in float32. bfloat16 has float32's range: it keeps its dtype.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def _no_autocast(device: torch.device):
    """The op computes in the dtype of the weights it is given: the cuBLAS calls inside it must not be
    autocast (their outputs feed kernels and buffers typed by that dtype). Autocast itself is applied
    outside the op, by :func:`_weights_for_autocast`."""
    return torch.autocast(device_type=device.type, enabled=False)


def _weights_for_autocast(weights: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
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


def _device_guard(device: torch.device):
    """Launch on the tensors' GPU (Triton uses the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Forward and backward (plain functions on tensors; the custom ops below wrap them)


def _gather(hidden: torch.Tensor, anchor_index: torch.Tensor | None, dtype) -> torch.Tensor:
    h = hidden.reshape(-1, hidden.shape[-1])
    if anchor_index is not None:
        h = h.index_select(0, anchor_index)
    return h.to(dtype)


def _time_mode(time: torch.Tensor | None, time_sampling: str) -> int:
    return TIME_EXPLICIT if time is not None else _TIME_MODES[time_sampling]


def _row_coefficients(n: int, m: int, e: int, weight, reduction: str, device) -> torch.Tensor:
    """``coef[a] = dL/d row_sq[a*M+m] = w_a / (M E denominator)``: float32 [N], no host sync."""
    w = torch.ones(n, dtype=torch.float32, device=device) if weight is None else weight.to(torch.float32)
    coef = w / float(m * e)
    if reduction == "mean":
        total = w.sum()
        coef = coef / torch.where(total > 0, total, torch.ones_like(total))
    return coef


def _fused_forward(hidden, target, anchor_index, seed, noise, time, weight, cond_weight, cond_bias,
                   in_x_weight, in_t_weight, time_frequencies, hidden_weights, hidden_biases, out_weight,
                   out_bias, num_samples, source_std, time_sampling, time_mean, time_std, reduction,
                   compute_grads=True):
    """Returns ``(loss, zs [L, R, Hd], g_v [R, E], dW_o [E, Hd], db_o [E])`` (gradients for dL_out = 1).

    Without ``compute_grads`` (no autograd), ``g_v``, ``dW_o`` and ``db_o`` are empty and not computed.
    """
    dtype, device = cond_weight.dtype, hidden.device
    width, embed, features = cond_weight.shape[0], out_weight.shape[0], in_t_weight.shape[1]
    h = _gather(hidden, anchor_index, dtype)
    n, m = h.shape[0], num_samples
    rows = n * m
    depth = len(hidden_weights) + 1
    configs = launch_configs(width, embed, features, h.shape[1], dtype)
    precision = _dot_precision(dtype)
    target = target.contiguous()
    noise = noise.contiguous() if noise is not None else None
    time = time.contiguous() if time is not None else None
    time_mode = _time_mode(time, time_sampling)

    zs = _new_buffer((depth, rows, width), dtype, device)
    grad_v = _new_buffer((rows, embed) if compute_grads else (0,), _gradient_dtype(dtype), device)
    row_sq = _new_buffer((rows,), torch.float32, device)
    coef = _row_coefficients(n, m, embed, weight, reduction, device)
    if rows > 0:
        cond = torch.addmm(cond_bias, h, cond_weight.t())  # c once per anchor, shared by its M rows
        with _device_guard(device):
            config = configs.input_forward
            grid = (triton.cdiv(rows, config["BLOCK_R"]), triton.cdiv(width, config["BLOCK_H"]))
            flow_input_forward_kernel[grid](
                seed, noise, time, target, cond, in_x_weight.contiguous(), in_t_weight.contiguous(),
                time_frequencies, zs[0], rows, m, embed, features, width, target.stride(0),
                float(source_std), float(time_mean), float(time_std),
                TIME_MODE=time_mode, EXPLICIT_NOISE=noise is not None, DOT_PRECISION=precision, **config)
            for k, (w, b) in enumerate(zip(hidden_weights, hidden_biases)):
                torch.addmm(b, F.silu(zs[k]), w.t(), out=zs[k + 1])
            config = configs.output_loss
            flow_output_loss_kernel[(triton.cdiv(rows, config["BLOCK_R"]),)](
                seed, noise, target, zs[depth - 1], out_weight.contiguous(), out_bias, coef, grad_v, row_sq,
                rows, m, embed, width, target.stride(0), float(source_std),
                EXPLICIT_NOISE=noise is not None, WRITE_GRAD=compute_grads, DOT_PRECISION=precision, **config)
    per_anchor = row_sq.view(n, m).sum(dim=1) / float(m * embed)  # l_a
    loss = reduce_anchor_losses(per_anchor, weight, reduction)  # per_anchor is float32
    if not compute_grads:
        return loss, zs, grad_v, out_weight.new_empty((0,)), out_bias.new_empty((0,))
    # Gradient-in-forward for the output layer: backward then needs neither v nor u.
    d_out_weight = grad_v.t() @ F.silu(zs[depth - 1]).to(grad_v.dtype)
    d_out_bias = grad_v.sum(dim=0)
    return loss, zs, grad_v, d_out_weight, d_out_bias


def _input_weight_grad(dz1, seed, noise, time, target, time_frequencies, num_samples, source_std,
                       time_mode, time_mean, time_std, columns, time_features, configs, precision):
    """``dz1^T x_s`` ([Hd, E]) or ``dz1^T e_s`` ([Hd, F]): fixed split-R partials, summed in order."""
    rows, width = dz1.shape
    embed, features = target.shape[1], time_frequencies.shape[0] * 2
    config = configs.weight_grad_t if time_features else configs.weight_grad_x
    block_r = config["BLOCK_R"]
    rows_per_split = block_r * triton.cdiv(triton.cdiv(rows, block_r), configs.max_splits)
    splits = triton.cdiv(rows, rows_per_split)
    partial = _new_buffer((splits, width, columns), torch.float32, dz1.device)
    grid = (triton.cdiv(width, config["BLOCK_H"]), triton.cdiv(columns, config["BLOCK_C"]), splits)
    flow_input_weight_grad_kernel[grid](
        seed, noise, time, target, time_frequencies, dz1, partial,
        rows, num_samples, embed, features, width, rows_per_split, target.stride(0),
        float(source_std), float(time_mean), float(time_std),
        TIME_FEATURES=time_features, TIME_MODE=time_mode, EXPLICIT_NOISE=noise is not None,
        DOT_PRECISION=precision, **config)
    return partial.sum(dim=0).to(dz1.dtype)


def _scatter_anchor_rows(dh, anchor_index, hidden, scale, configs):
    """``d_hidden[p] = scale * sum_{i: anchor_index[i] = p} dh[i]`` in a fixed order: [*hidden.shape]."""
    out = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
    n, d = dh.shape
    if n == 0:
        return out
    sorted_index, order = torch.sort(anchor_index, stable=True)
    config = configs.scatter
    scatter_rows_kernel[(n, triton.cdiv(d, config["BLOCK_D"]))](dh, sorted_index, order, out, scale, n, d, **config)
    return out


def _fused_backward(grad_loss, hidden, target, anchor_index, seed, noise, time, zs, grad_v, d_out_weight,
                    d_out_bias, cond_weight, in_x_weight, in_t_weight, out_weight, time_frequencies,
                    hidden_weights, num_samples, source_std, time_sampling, time_mean, time_std, grad_scale,
                    need_hidden_grad):
    """All gradients, in the order ``[d_hidden, dW_c, db_c, dW_x, dW_t, *dW_k, *db_k, dW_o, db_o]``.

    ``d_hidden`` is an empty tensor when ``need_hidden_grad`` is False (grad_scale == 0 or a
    detached ``hidden``): then no work at all is spent on it.
    """
    dtype, device = cond_weight.dtype, hidden.device
    width, embed, features = cond_weight.shape[0], out_weight.shape[0], in_t_weight.shape[1]
    depth, rows = zs.shape[0], zs.shape[1]
    n = rows // num_samples
    configs = launch_configs(width, embed, features, cond_weight.shape[1], dtype)
    g = grad_loss.to(torch.float32)
    target = target.contiguous()
    noise = noise.contiguous() if noise is not None else None
    time = time.contiguous() if time is not None else None

    d_out_w = (d_out_weight.to(torch.float32) * g).to(dtype)
    d_out_b = (d_out_bias.to(torch.float32) * g).to(dtype)
    if grad_v.dtype == dtype:  # fold g into W_o in float32: no [R, E] temporary, and g itself is not rounded
        da = grad_v @ (out_weight.to(torch.float32) * g).to(dtype)  # dL/da_L [R, Hd]
    else:  # float16 head, float32 g_v: scaled by g (e.g. the loss scale) before it is rounded to float16
        da = (grad_v * g).to(dtype) @ out_weight
    d_hidden_w, d_hidden_b = [None] * (depth - 1), [None] * (depth - 1)
    for k in range(depth - 1, 0, -1):
        dz = torch.ops.aten.silu_backward(da, zs[k])
        d_hidden_w[k - 1] = dz.t() @ F.silu(zs[k - 1])
        d_hidden_b[k - 1] = dz.sum(dim=0)
        da = dz @ hidden_weights[k - 1]
    dz1 = torch.ops.aten.silu_backward(da, zs[0]).contiguous()

    if rows > 0:
        time_mode = _time_mode(time, time_sampling)
        precision = _dot_precision(dtype)
        with _device_guard(device):
            d_in_x = _input_weight_grad(dz1, seed, noise, time, target, time_frequencies, num_samples,
                                        source_std, time_mode, time_mean, time_std, embed, False, configs,
                                        precision)
            d_in_t = _input_weight_grad(dz1, seed, noise, time, target, time_frequencies, num_samples,
                                        source_std, time_mode, time_mean, time_std, features, True, configs,
                                        precision)
    else:
        d_in_x, d_in_t = in_x_weight.new_zeros(in_x_weight.shape), in_t_weight.new_zeros(in_t_weight.shape)

    dc = dz1.view(n, num_samples, width).sum(dim=1)  # the M rows of an anchor are contiguous
    d_cond_b = dc.sum(dim=0)
    h = _gather(hidden, anchor_index, dtype)
    d_cond_w = dc.t() @ h
    if need_hidden_grad:
        dh = dc @ cond_weight  # [N, D]; dc already carries grad_loss
        if anchor_index is None:
            d_hidden = (dh.to(torch.float32) * float(grad_scale)).to(hidden.dtype).reshape(hidden.shape)
        else:
            scale = torch.full((), float(grad_scale), dtype=torch.float32, device=device)  # fill: no copy
            with _device_guard(device):
                d_hidden = _scatter_anchor_rows(dh, anchor_index, hidden, scale, configs)
    else:
        d_hidden = hidden.new_empty((0,))
    return [d_hidden, d_cond_w, d_cond_b, d_in_x, d_in_t, *d_hidden_w, *d_hidden_b, d_out_w, d_out_b]


# ---------------------------------------------------------------------------------------------
# torch.library registration: opaque ops that torch.compile can trace around


@torch.library.custom_op("sfr_kernels::fused_sfr_loss", mutates_args=())
def fused_sfr_loss_op(
    hidden: torch.Tensor, target: torch.Tensor, anchor_index: torch.Tensor | None, seed: torch.Tensor,
    noise: torch.Tensor | None, time: torch.Tensor | None, weight: torch.Tensor | None,
    cond_weight: torch.Tensor, cond_bias: torch.Tensor, in_x_weight: torch.Tensor, in_t_weight: torch.Tensor,
    time_frequencies: torch.Tensor, hidden_weights: List[torch.Tensor], hidden_biases: List[torch.Tensor],
    out_weight: torch.Tensor, out_bias: torch.Tensor, num_samples: int, source_std: float, time_sampling: str,
    time_mean: float, time_std: float, reduction: str, grad_scale: float, need_hidden_grad: bool,
    compute_grads: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: ``(loss, zs, g_v, dW_o, db_o)``; only ``loss`` is differentiable."""
    with _no_autocast(hidden.device):
        loss, zs, grad_v, d_out_w, d_out_b = _fused_forward(
            hidden, target, anchor_index, seed, noise, time, weight, cond_weight, cond_bias, in_x_weight,
            in_t_weight, time_frequencies, hidden_weights, hidden_biases, out_weight, out_bias, num_samples,
            source_std, time_sampling, time_mean, time_std, reduction, compute_grads)
    return loss, zs, grad_v, d_out_w, d_out_b


@fused_sfr_loss_op.register_fake
def _fused_sfr_loss_fake(hidden, target, anchor_index, seed, noise, time, weight, cond_weight, cond_bias,
                         in_x_weight, in_t_weight, time_frequencies, hidden_weights, hidden_biases, out_weight,
                         out_bias, num_samples, source_std, time_sampling, time_mean, time_std, reduction,
                         grad_scale, need_hidden_grad, compute_grads):
    n = anchor_index.shape[0] if anchor_index is not None else hidden.shape[0]
    rows, dtype = n * num_samples, cond_weight.dtype
    width, embed = cond_weight.shape[0], out_weight.shape[0]
    if not compute_grads:
        return (hidden.new_empty((), dtype=torch.float32),
                hidden.new_empty((len(hidden_weights) + 1, rows, width), dtype=dtype),
                hidden.new_empty((0,), dtype=dtype), out_weight.new_empty((0,)), out_bias.new_empty((0,)))
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty((len(hidden_weights) + 1, rows, width), dtype=dtype),
            hidden.new_empty((rows, embed), dtype=_gradient_dtype(dtype)),
            out_weight.new_empty(out_weight.shape, dtype=_gradient_dtype(dtype)),
            out_bias.new_empty(out_bias.shape, dtype=_gradient_dtype(dtype)))


@torch.library.custom_op("sfr_kernels::fused_sfr_loss_backward", mutates_args=())
def fused_sfr_loss_backward_op(
    grad_loss: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor, anchor_index: torch.Tensor | None,
    seed: torch.Tensor, noise: torch.Tensor | None, time: torch.Tensor | None, zs: torch.Tensor,
    grad_v: torch.Tensor, d_out_weight: torch.Tensor, d_out_bias: torch.Tensor, cond_weight: torch.Tensor,
    in_x_weight: torch.Tensor, in_t_weight: torch.Tensor, out_weight: torch.Tensor,
    time_frequencies: torch.Tensor, hidden_weights: List[torch.Tensor], num_samples: int, source_std: float,
    time_sampling: str, time_mean: float, time_std: float, grad_scale: float, need_hidden_grad: bool,
) -> List[torch.Tensor]:
    """Fused backward: ``[d_hidden, dW_c, db_c, dW_x, dW_t, *dW_k, *db_k, dW_o, db_o]``."""
    with _no_autocast(hidden.device):
        return _fused_backward(grad_loss, hidden, target, anchor_index, seed, noise, time, zs, grad_v,
                               d_out_weight, d_out_bias, cond_weight, in_x_weight, in_t_weight, out_weight,
                               time_frequencies, hidden_weights, num_samples, source_std, time_sampling,
                               time_mean, time_std, grad_scale, need_hidden_grad)


@fused_sfr_loss_backward_op.register_fake
def _fused_sfr_loss_backward_fake(grad_loss, hidden, target, anchor_index, seed, noise, time, zs, grad_v,
                                  d_out_weight, d_out_bias, cond_weight, in_x_weight, in_t_weight, out_weight,
                                  time_frequencies, hidden_weights, num_samples, source_std, time_sampling,
                                  time_mean, time_std, grad_scale, need_hidden_grad):
    # new_empty(shape), not empty_like: the real outputs are contiguous whatever the inputs' strides
    # (a transposed hidden included), and Inductor checks the strides the fake promises.
    d_hidden = hidden.new_empty(hidden.shape) if need_hidden_grad else hidden.new_empty((0,))
    width = cond_weight.shape[0]
    return [d_hidden, cond_weight.new_empty(cond_weight.shape), cond_weight.new_empty((width,)),
            in_x_weight.new_empty(in_x_weight.shape), in_t_weight.new_empty(in_t_weight.shape),
            *[w.new_empty(w.shape) for w in hidden_weights],
            *[cond_weight.new_empty((width,)) for _ in hidden_weights],
            out_weight.new_empty(out_weight.shape), out_weight.new_empty(d_out_bias.shape)]


def _setup_context(ctx, inputs, output):
    (hidden, target, anchor_index, seed, noise, time, weight, cond_weight, cond_bias, in_x_weight, in_t_weight,
     time_frequencies, hidden_weights, hidden_biases, out_weight, out_bias, num_samples, source_std,
     time_sampling, time_mean, time_std, reduction, grad_scale, need_hidden_grad, compute_grads) = inputs
    _, zs, grad_v, d_out_w, d_out_b = output
    ctx.mark_non_differentiable(zs, grad_v, d_out_w, d_out_b)
    ctx.save_for_backward(hidden, target, anchor_index, seed, noise, time, zs, grad_v, d_out_w, d_out_b,
                          cond_weight, in_x_weight, in_t_weight, out_weight, time_frequencies, *hidden_weights)
    ctx.options = (num_samples, source_std, time_sampling, time_mean, time_std, grad_scale, need_hidden_grad)


def _backward(ctx, grad_loss, *_unused_grads):
    saved = ctx.saved_tensors
    (hidden, target, anchor_index, seed, noise, time, zs, grad_v, d_out_w, d_out_b, cond_weight, in_x_weight,
     in_t_weight, out_weight, time_frequencies) = saved[:15]
    hidden_weights = list(saved[15:])
    num_samples, source_std, time_sampling, time_mean, time_std, grad_scale, need_hidden_grad = ctx.options
    grads = fused_sfr_loss_backward_op(
        grad_loss, hidden, target, anchor_index, seed, noise, time, zs, grad_v, d_out_w, d_out_b, cond_weight,
        in_x_weight, in_t_weight, out_weight, time_frequencies, hidden_weights, num_samples, source_std,
        time_sampling, time_mean, time_std, grad_scale, need_hidden_grad)
    depth_1 = len(hidden_weights)
    d_hidden, d_cond_w, d_cond_b, d_in_x, d_in_t = grads[:5]
    d_hidden_w, d_hidden_b = grads[5:5 + depth_1], grads[5 + depth_1:5 + 2 * depth_1]
    d_out_w, d_out_b = grads[5 + 2 * depth_1:]
    return (d_hidden if need_hidden_grad else None, None, None, None, None, None, None,
            d_cond_w, d_cond_b, d_in_x, d_in_t, None, list(d_hidden_w), list(d_hidden_b), d_out_w, d_out_b,
            None, None, None, None, None, None, None, None, None)


fused_sfr_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Entry point


def _seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The seed as a 0-dim int64 tensor on ``device`` that the kernels read in place.

    A device tensor is used as is (a CUDA graph replays with whatever value it holds then). An int
    becomes a device tensor through a fill kernel (no host-to-device copy, hence no sync).
    """
    if isinstance(seed, torch.Tensor):
        if seed.device == device:
            return seed
        return torch.full((), int(seed), dtype=torch.int64, device=device)  # CPU scalar: no device sync
    return torch.full((), int(seed), dtype=torch.int64, device=device)


def sfr_loss_triton(hidden, target, head, *, anchor_index=None, num_samples=1, source_std=1.0,
                    time_sampling="uniform", seed=0, noise=None, time=None, weight=None, grad_scale=1.0,
                    reduction="mean", time_mean=0.0, time_std=1.0):
    """:func:`sfr_kernels.sfr_loss` with the fused kernels (arguments already validated).

    Falls back to the reference, with a one-time warning, for heads the kernels do not implement
    (:func:`unsupported_head_reason`) and when ``target``/``noise``/``time``/``weight`` require
    gradients (the fused op differentiates only with respect to ``hidden`` and the head).
    """
    kwargs = dict(anchor_index=anchor_index, num_samples=num_samples, source_std=source_std,
                  time_sampling=time_sampling, seed=seed, noise=noise, time=time, weight=weight,
                  grad_scale=grad_scale, reduction=reduction, time_mean=time_mean, time_std=time_std)
    reason = unsupported_head_reason(head)
    if reason is None and any(t is not None and t.requires_grad for t in (target, noise, time, weight)):
        reason = "gradients with respect to target/noise/time/weight are not implemented by the kernels"
    if reason is not None:
        _warn_once(reason)
        return sfr_loss_reference(hidden, target, head, **kwargs)

    need_hidden_grad = grad_scale > 0 and hidden.requires_grad and torch.is_grad_enabled()
    if not need_hidden_grad:
        hidden = hidden.detach()
    compute_grads = need_hidden_grad or (torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters()))
    layers = list(head.hidden_layers)
    cond_w, cond_b, in_x_w, in_t_w, out_w, out_b, *hidden_params = _weights_for_autocast(
        [head.cond.weight, head.cond.bias, head.in_x.weight, head.in_t.weight, head.out.weight, head.out.bias,
         *[layer.weight for layer in layers], *[layer.bias for layer in layers]], hidden.device)
    loss, *_ = fused_sfr_loss_op(
        hidden, target, anchor_index, _seed_tensor(seed, hidden.device), noise, time, weight,
        cond_w, cond_b, in_x_w, in_t_w, head.time_frequencies,
        hidden_params[:len(layers)], hidden_params[len(layers):], out_w, out_b,
        int(num_samples), float(source_std), str(time_sampling), float(time_mean), float(time_std),
        str(reduction), float(grad_scale), bool(need_hidden_grad), bool(compute_grads))
    return loss
