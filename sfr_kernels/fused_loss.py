"""Fused Triton SFR loss: the forward and backward passes, their ``torch.library`` ops and ``sfr_loss_triton``.

(No ``from __future__ import annotations`` here: torch 2.4's custom_op reads the real annotations.)

Computes exactly :func:`sfr_kernels.reference.sfr_loss_reference` for the default "mlp" head
(``sfr.FlowHead``; docs/design.md) over R = N*M (anchor, sample) rows ``r = a*M + m``. The op is
compute-bound, so each piece of work is done once and the time goes to tensor-core GEMMs; as in
Liger's fused linear cross-entropy, the gradients are formed in the forward pass (everything the
backward needs is a few small tensors), and the backward only scales them by the incoming gradient.

Forward (``H`` = head dtype; every GEMM accumulates in float32):

====  ========================================================  =====================================
 1    ``X = [x_s | e_s]`` [R, E+F] H                            ``flow_draws``: each draw once
 2    ``c = h W_c^T + b_c`` [N, Hd] H                           cuBLAS, once per anchor
 3    ``z1 = X [W_x|W_t]^T + c[a]``, ``a1 = silu(z1)``          ``flow_layers`` GEMM + epilogue
 4    ``z_{k+1} = a_k W_k^T + b_k``, ``a_{k+1} = silu(.)``      ``flow_layers`` GEMM + epilogue
 5    ``v = a_L W_o^T + b_o``; ``row_sq``; ``g_v = 2w(v-u)``    ``flow_output`` GEMM + loss epilogue
 6    ``dW_o = g_v^T a_L``, ``db_o = sum g_v`` (float32)        ``weight_grad``
 7    ``dz_L = (g_v W_o) silu'(z_L)`` over ``z_L``              ``flow_layers`` GEMM + epilogue
 8    ``dz_k = (dz_{k+1} W_k) silu'(z_k)``, ``a_k`` over z_k;   ``flow_layers`` + ``weight_grad``
      ``dW_k = dz_{k+1}^T a_k``, ``db_k = sum dz_{k+1}``
 9    ``[dW_x|dW_t] = dz_1^T X``, ``db_c = sum dz_1``            ``weight_grad``
10    ``dc = sum_m dz_1`` [N, Hd] float32                       step 8's epilogue (M a power of 2)
====  ========================================================  =====================================

The gradients of steps 5-10 are *unnormalised*: the loss's global factor ``norm = 1 / (M E
denominator)`` (``denominator = sum w`` for "mean", 1 for "sum") is kept as a device scalar. Backward,
with the incoming gradient ``g`` (a device scalar; no host sync), multiplies every float32 weight
gradient by ``g * norm`` and rounds once to the parameters' dtype, and runs the two GEMMs on the
hidden-size side: ``dW_c = (g norm dc)^T h`` and ``dh = (g norm lambda dc) W_c`` (cuBLAS), scattered
into ``[B*T, D]`` through ``anchor_index`` (``scatter_rows``, duplicates summed in a fixed order).
``grad_scale == 0`` (or a detached ``hidden``) skips ``dh`` entirely.

Kept from forward to backward: ``dc`` [N, Hd] and the head's float32 weight gradients (no activation,
no draw, no ``[N, D]`` tensor). Transient in the forward: ``X``, ``z_1..z_L``, one activation and one
gradient buffer [R, Hd] at a time, ``g_v`` [R, E]. Never written: ``x0``, ``x_s`` in float32, ``u``,
``v``. Philox: each source draw is evaluated twice in all (step 1, and step 5's epilogue for ``u``).

Determinism: every reduction is a fixed-order torch/cuBLAS reduction or a fixed split of rows whose
float32 partials are summed in order; the anchor scatter sorts the index stably. There is no float
atomic anywhere, so a seed gives bit-identical loss and gradients.
"""
from typing import List

import torch

from sfr_kernels.flow_draws import draw_flow_inputs
from sfr_kernels.flow_layers import linear_silu, linear_silu_backward
from sfr_kernels.flow_output import output_loss
from sfr_kernels.head_support import (
    fused_path_reason,
    head_weights,
    no_autocast,
    warn_fallback_once,
    weights_for_autocast,
)
from sfr_kernels.launch import device_guard, dot_precision, launch_configs, new_buffer
from sfr_kernels.reference import TIME_MODES, reduce_anchor_losses, sfr_loss_reference
from sfr_kernels.scatter_rows import scatter_anchor_rows
from sfr_kernels.sharding import call_inside, inner_head, runs_in_call
from sfr_kernels.weight_grad import weight_grad

# Outputs of the forward op after the loss (all saved for backward), in this order:
SAVED = ("norm", "dc", "d_input", "d_cond_bias", "d_out_weight", "d_out_bias")  # + d_hidden_weights, d_hidden_biases


def _gather(hidden: torch.Tensor, anchor_index: torch.Tensor | None, dtype) -> torch.Tensor:
    h = hidden.reshape(-1, hidden.shape[-1])
    if anchor_index is not None:
        h = h.index_select(0, anchor_index)
    return h.to(dtype)


def _gradient_norm(n: int, m: int, embed: int, weight, reduction: str, device) -> torch.Tensor:
    """``1 / (M E denominator)``: float32 0-dim, no host sync (see the module doc)."""
    if reduction == "sum":
        return torch.full((), 1.0 / (m * embed), dtype=torch.float32, device=device)
    if weight is None:
        return torch.full((), 1.0 / (m * embed * max(n, 1)), dtype=torch.float32, device=device)
    total = weight.to(torch.float32).sum()
    return 1.0 / (torch.where(total > 0, total, torch.ones_like(total)) * float(m * embed))


def _fused_forward(hidden, target, anchor_index, draw_key, noise, time, weight, cond_weight, cond_bias, in_x_weight,
                   in_t_weight, time_frequencies, hidden_weights, hidden_biases, out_weight, out_bias, num_samples,
                   source_std, time_sampling, time_mean, time_std, reduction, need_hidden_grad, need_weight_grads):
    """``[loss, norm, dc, d_input, d_cond_bias, d_out_weight, d_out_bias, *d_hidden_weights, *d_hidden_biases]``.

    Steps 1-10 of the module doc. The gradients are unnormalised float32 (empty tensors when not
    needed: ``dc`` without either flag, the weight gradients without ``need_weight_grads``).
    """
    dtype, device = cond_weight.dtype, hidden.device
    configs, precision = launch_configs(dtype), dot_precision(dtype)
    width, embed = cond_weight.shape[0], out_weight.shape[0]
    depth = len(hidden_weights) + 1
    h = _gather(hidden, anchor_index, dtype)
    n, m = h.shape[0], num_samples
    rows = n * m
    target = target.contiguous()
    noise = noise.contiguous() if noise is not None else None
    time = time.contiguous() if time is not None else None
    weight = weight.contiguous() if weight is not None else None
    out_weight = out_weight.contiguous()
    time_mode = TIME_MODES["explicit"] if time is not None else TIME_MODES[time_sampling]
    need_chain = need_hidden_grad or need_weight_grads

    def empty():  # a fresh one each time: the outputs of a custom op may not alias each other
        return torch.empty((0,), dtype=torch.float32, device=device)

    with device_guard(device):
        x = draw_flow_inputs(draw_key, noise, time, target, time_frequencies, m, source_std, time_mode, time_mean,
                             time_std, dtype, configs.inputs)
        cond = torch.addmm(cond_bias, h, cond_weight.t())  # c once per anchor, shared by its M rows
        zs = new_buffer((depth, rows, width), dtype, device)
        act = linear_silu(x, torch.cat([in_x_weight, in_t_weight], dim=1), cond, zs[0], m, precision, configs.layer)
        del cond
        for k, (w, b) in enumerate(zip(hidden_weights, hidden_biases)):
            act = linear_silu(act, w, b, zs[k + 1], m, precision, configs.layer)
        row_sq, grad_v = output_loss(act, out_weight, out_bias, draw_key, noise, target, weight, m, source_std,
                                     need_chain, precision, configs.output)
        loss = reduce_anchor_losses(row_sq.view(n, m).sum(dim=1) / float(m * embed), weight, reduction)
        norm = _gradient_norm(n, m, embed, weight, reduction, device)
        if not need_chain:
            return [loss, norm, *[empty() for _ in range(5 + 2 * (depth - 1))]]

        d_out_w, d_out_b = weight_grad(grad_v, act, precision, configs, bias=True) if need_weight_grads else (empty(), empty())
        del act
        dz = zs[depth - 1]
        dc = linear_silu_backward(grad_v, out_weight, dz, dz, precision, configs.layer_backward,  # dz_L over z_L
                                  samples_per_anchor=m if depth == 1 else 0)  # dc = sum_m dz_1 for a 1-layer head
        del grad_v
        free = None  # an [R, Hd] buffer no longer needed, reused for the next dz
        d_hidden_w, d_hidden_b = [empty() for _ in range(depth - 1)], [empty() for _ in range(depth - 1)]
        for k in range(depth - 1, 0, -1):
            z = zs[k - 1]
            dz_below = free if free is not None else new_buffer((rows, width), dtype, device)
            sums = linear_silu_backward(dz, hidden_weights[k - 1], z, dz_below, precision, configs.layer_backward,
                                        act_out=z if need_weight_grads else None,  # a_k = silu(z_k) over z_k
                                        samples_per_anchor=m if k == 1 else 0)  # dc = sum_m dz_1
            if need_weight_grads:
                d_hidden_w[k - 1], d_hidden_b[k - 1] = weight_grad(dz, z, precision, configs, bias=True)
            free, dz = dz, dz_below
            if k == 1:
                dc = sums
        del free
        if need_weight_grads:
            d_input, d_cond_b = weight_grad(dz, x, precision, configs, bias=True)
        else:
            d_input, d_cond_b = empty(), empty()
        del x
    return [loss, norm, dc, d_input, d_cond_b, d_out_w, d_out_b, *d_hidden_w, *d_hidden_b]


def _fused_backward(grad_loss, hidden, anchor_index, cond_weight, saved, embed, grad_scale, need_hidden_grad,
                    need_weight_grads):
    """``[d_hidden, dW_c, db_c, dW_x, dW_t, *dW_k, *db_k, dW_o, db_o]`` from the forward's ``saved`` outputs.

    Empty tensors for what is not needed (``d_hidden`` without ``need_hidden_grad``, every head
    gradient without ``need_weight_grads``).
    """
    norm, dc, d_input, d_cond_b, d_out_w, d_out_b, *d_layers = saved
    depth_1 = len(d_layers) // 2
    dtype, device = cond_weight.dtype, hidden.device
    scale = grad_loss.to(torch.float32) * norm  # dL_total/dL times the loss's global factor: 0-dim, on the device

    def empty():  # a fresh one each time (outputs of a custom op may not alias), typed as the fake promises
        return cond_weight.new_empty((0,))

    def finish(grad, factor=scale):  # float32, unnormalised -> grad * factor in the head's dtype, one rounding, one pass
        return torch.mul(grad, factor, out=torch.empty(grad.shape, dtype=dtype, device=device))

    if need_weight_grads:
        d_cond_w = finish(dc).t() @ _gather(hidden, anchor_index, dtype)
        head_grads = [d_cond_w, finish(d_cond_b), finish(d_input[:, :embed]), finish(d_input[:, embed:]),
                      *[finish(g) for g in d_layers], finish(d_out_w), finish(d_out_b)]
    else:
        head_grads = [empty() for _ in range(5 + 2 * depth_1 + 2)]
    if not need_hidden_grad:
        return [hidden.new_empty((0,)), *head_grads]
    dh = finish(dc, scale * grad_scale) @ cond_weight  # [N, D]: lambda scales the backbone's gradient only
    if anchor_index is None:
        d_hidden = dh.to(hidden.dtype).reshape(hidden.shape)
    else:
        with device_guard(device):
            d_hidden = scatter_anchor_rows(dh, anchor_index, hidden, launch_configs(dtype).scatter)
    return [d_hidden, *head_grads]


# ---------------------------------------------------------------------------------------------
# torch.library registration: opaque ops that torch.compile can trace around

# Part of the ops' names: a compiled graph that calls these ops is cached by Inductor (FX graph cache)
# under a key that does not see the ops' implementation, so a new layout of the outputs needs new names.
OP_VERSION = 3  # bumped when the op's signature or meaning changes (Inductor caches by name)


@torch.library.custom_op(f"sfr_kernels::fused_sfr_loss_v{OP_VERSION}", mutates_args=())
def fused_sfr_loss_op(
    hidden: torch.Tensor, target: torch.Tensor, anchor_index: torch.Tensor | None, draw_key: torch.Tensor,
    noise: torch.Tensor | None, time: torch.Tensor | None, weight: torch.Tensor | None,
    cond_weight: torch.Tensor, cond_bias: torch.Tensor, in_x_weight: torch.Tensor, in_t_weight: torch.Tensor,
    time_frequencies: torch.Tensor, hidden_weights: List[torch.Tensor], hidden_biases: List[torch.Tensor],
    out_weight: torch.Tensor, out_bias: torch.Tensor, num_samples: int, source_std: float, time_sampling: str,
    time_mean: float, time_std: float, reduction: str, grad_scale: float, need_hidden_grad: bool,
    need_weight_grads: bool,
) -> List[torch.Tensor]:
    """Fused forward: ``[loss, *saved]`` (see :func:`_fused_forward`); only ``loss`` is differentiable."""
    with no_autocast(hidden.device):
        return _fused_forward(hidden, target, anchor_index, draw_key, noise, time, weight, cond_weight, cond_bias,
                              in_x_weight, in_t_weight, time_frequencies, hidden_weights, hidden_biases, out_weight,
                              out_bias, num_samples, source_std, time_sampling, time_mean, time_std, reduction,
                              need_hidden_grad, need_weight_grads)


@fused_sfr_loss_op.register_fake
def _fused_sfr_loss_fake(hidden, target, anchor_index, draw_key, noise, time, weight, cond_weight, cond_bias,
                         in_x_weight, in_t_weight, time_frequencies, hidden_weights, hidden_biases, out_weight,
                         out_bias, num_samples, source_std, time_sampling, time_mean, time_std, reduction,
                         grad_scale, need_hidden_grad, need_weight_grads):
    n = anchor_index.shape[0] if anchor_index is not None else hidden.reshape(-1, hidden.shape[-1]).shape[0]
    width, embed = cond_weight.shape[0], out_weight.shape[0]
    inputs = in_x_weight.shape[1] + in_t_weight.shape[1]

    def grad(*shape, needed=need_weight_grads):
        return hidden.new_empty(shape if needed else (0,), dtype=torch.float32)

    return [hidden.new_empty((), dtype=torch.float32), hidden.new_empty((), dtype=torch.float32),
            grad(n, width, needed=need_hidden_grad or need_weight_grads), grad(width, inputs), grad(width),
            grad(embed, width), grad(embed), *[grad(width, width) for _ in hidden_weights],
            *[grad(width) for _ in hidden_weights]]


@torch.library.custom_op(f"sfr_kernels::fused_sfr_loss_backward_v{OP_VERSION}", mutates_args=())
def fused_sfr_loss_backward_op(
    grad_loss: torch.Tensor, hidden: torch.Tensor, anchor_index: torch.Tensor | None, cond_weight: torch.Tensor,
    saved: List[torch.Tensor], embed: int, grad_scale: float, need_hidden_grad: bool, need_weight_grads: bool,
) -> List[torch.Tensor]:
    """Fused backward: ``[d_hidden, dW_c, db_c, dW_x, dW_t, *dW_k, *db_k, dW_o, db_o]``."""
    with no_autocast(hidden.device):
        return _fused_backward(grad_loss, hidden, anchor_index, cond_weight, saved, embed, grad_scale,
                               need_hidden_grad, need_weight_grads)


@fused_sfr_loss_backward_op.register_fake
def _fused_sfr_loss_backward_fake(grad_loss, hidden, anchor_index, cond_weight, saved, embed, grad_scale,
                                  need_hidden_grad, need_weight_grads):
    # new_empty(shape), not empty_like: the real outputs are contiguous whatever the inputs' strides
    # (a transposed hidden included), and Inductor checks the strides the fake promises.
    d_input, d_out_w, d_layers = saved[2], saved[4], saved[6:]
    width, dtype = cond_weight.shape[0], cond_weight.dtype

    def grad(*shape):
        return cond_weight.new_empty(shape if need_weight_grads else (0,), dtype=dtype)

    d_hidden = hidden.new_empty(hidden.shape) if need_hidden_grad else hidden.new_empty((0,))
    features = d_input.shape[1] - embed if need_weight_grads else 0
    return [d_hidden, grad(*cond_weight.shape), grad(width), grad(width, embed), grad(width, features),
            *[grad(width, width) for _ in d_layers[:len(d_layers) // 2]],
            *[grad(width) for _ in d_layers[:len(d_layers) // 2]], grad(*d_out_w.shape), grad(embed)]


def _setup_context(ctx, inputs, output):
    (hidden, target, anchor_index, draw_key, noise, time, weight, cond_weight, cond_bias, in_x_weight, in_t_weight,
     time_frequencies, hidden_weights, hidden_biases, out_weight, out_bias, num_samples, source_std,
     time_sampling, time_mean, time_std, reduction, grad_scale, need_hidden_grad, need_weight_grads) = inputs
    saved = output[1:]
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # the saved outputs get no gradient: no zero-filled tensors for them
    ctx.save_for_backward(hidden, anchor_index, cond_weight, *saved)
    ctx.options = (out_weight.shape[0], grad_scale, need_hidden_grad, need_weight_grads, len(hidden_weights))


def _backward(ctx, output_grads):
    grad_loss = output_grads[0]  # the saved outputs are non-differentiable: their entries are None
    hidden, anchor_index, cond_weight, *saved = ctx.saved_tensors
    embed, grad_scale, need_hidden_grad, need_weight_grads, depth_1 = ctx.options
    nones = (None,) * 9
    if grad_loss is None:  # the loss did not reach the output being differentiated
        return (None,) * 7 + (None, None, None, None, None, [None] * depth_1, [None] * depth_1, None, None) + nones
    grads = fused_sfr_loss_backward_op(grad_loss, hidden, anchor_index, cond_weight, saved, embed, grad_scale,
                                       need_hidden_grad, need_weight_grads)
    d_hidden, d_cond_w, d_cond_b, d_in_x, d_in_t = grads[:5]
    d_hidden_w, d_hidden_b = grads[5:5 + depth_1], grads[5 + depth_1:5 + 2 * depth_1]
    d_out_w, d_out_b = grads[5 + 2 * depth_1:]
    head = (d_cond_w, d_cond_b, d_in_x, d_in_t, None, list(d_hidden_w), list(d_hidden_b), d_out_w, d_out_b)
    if not need_weight_grads:
        head = (None, None, None, None, None, [None] * depth_1, [None] * depth_1, None, None)
    return (d_hidden if need_hidden_grad else None, None, None, None, None, None, None, *head) + nones


fused_sfr_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Entry point


def draw_key(seed, anchor_offset, num_samples: int, device: torch.device) -> torch.Tensor:
    """The int64 [2] tensor ``(seed, anchor_offset * M)`` on ``device`` that the kernels read in place:
    the Philox seed and the draw-layout row of this call's first (anchor, sample) row.

    Tensors already on ``device`` are combined there (a CUDA graph replays with whatever values they
    hold then). Ints, and CPU tensors (read on the host, which waits for no device work), become device
    scalars through fill kernels: never a host-to-device copy, hence no sync.
    """
    def slot(value, scale):
        if isinstance(value, torch.Tensor) and value.device == device:
            return value * scale if scale != 1 else value
        return torch.full((), int(value) * scale, dtype=torch.int64, device=device)

    return torch.stack([slot(seed, 1), slot(anchor_offset, num_samples)])


def sfr_loss_triton(hidden, target, head, *, anchor_index=None, num_samples=1, source_std=1.0,
                    time_sampling="uniform", seed=0, noise=None, time=None, weight=None, grad_scale=1.0,
                    reduction="mean", time_mean=0.0, time_std=1.0, anchor_offset=0):
    """:func:`sfr_kernels.sfr_loss` with the fused kernels (arguments already validated).

    Falls back to the reference, with a one-time warning, for heads the kernels do not implement
    (:func:`sfr_kernels.head_support.unsupported_head_reason`) and when ``target``/``noise``/``time``/
    ``weight`` require gradients (the fused op differentiates only with respect to ``hidden`` and the head).
    A head sharded by FSDP1/FSDP2/ZeRO-3, or with hooks of its own, gets the loss computed inside its
    call, so the engine gathers its weights and reduce-scatters their gradients
    (:mod:`sfr_kernels.sharding`).
    """
    kwargs = dict(anchor_index=anchor_index, num_samples=num_samples, source_std=source_std,
                  time_sampling=time_sampling, seed=seed, noise=noise, time=time, weight=weight,
                  grad_scale=grad_scale, reduction=reduction, time_mean=time_mean, time_std=time_std,
                  anchor_offset=anchor_offset)
    reason = fused_path_reason(target, head, noise=noise, time=time, weight=weight)
    if reason is not None:
        warn_fallback_once(reason)
        return sfr_loss_reference(hidden, target, head, **kwargs)

    inner = inner_head(head)
    options = (int(num_samples), float(source_std), str(time_sampling), float(time_mean), float(time_std),
               str(reduction), float(grad_scale))

    def loss(hidden, target, anchor_index, key, noise, time, weight):
        return _fused_call(inner, hidden, target, anchor_index, key, noise, time, weight, *options)

    key = draw_key(seed, anchor_offset, int(num_samples), hidden.device)
    inputs = (hidden, target, anchor_index, key, noise, time, weight)
    if runs_in_call(head):
        return call_inside(head, loss, *inputs)
    return loss(*inputs)


def _fused_call(head, hidden, target, anchor_index, key, noise, time, weight, num_samples, source_std,
                time_sampling, time_mean, time_std, reduction, grad_scale):
    """The fused op on ``head``'s weights as they are now (whole: inside the head's call when sharded)."""
    grad_enabled = torch.is_grad_enabled()
    need_hidden_grad = grad_scale > 0 and hidden.requires_grad and grad_enabled
    if not need_hidden_grad:
        hidden = hidden.detach()
    weights = head_weights(head)
    need_weight_grads = grad_enabled and any(w.requires_grad for w in weights)
    depth_1 = len(head.hidden_layers)
    cond_w, cond_b, in_x_w, in_t_w, out_w, out_b, *hidden_params = weights_for_autocast(weights, hidden.device)
    loss, *_ = fused_sfr_loss_op(
        hidden, target, anchor_index, key, noise, time, weight,
        cond_w, cond_b, in_x_w, in_t_w, head.time_frequencies,
        hidden_params[:depth_1], hidden_params[depth_1:], out_w, out_b,
        num_samples, source_std, time_sampling, time_mean, time_std, reduction, grad_scale,
        bool(need_hidden_grad), bool(need_weight_grads))
    return loss
