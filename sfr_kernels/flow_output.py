"""The head's output layer as one GEMM whose epilogue computes the loss and its gradient.

For a tile of rows ``r = a*M + m`` (anchor a, sample m) and embedding columns ``j``, given the last
activation ``a_L`` [R, Hd]::

    v[r, j]          = (a_L W_o^T)[r, j] + b_o[j]           rounded to the head's dtype (as the head outputs it)
    u[r, j]          = y[a, j] - x0[r, j]                    x0 regenerated from the draw key (flow_draws)
    row_sq[r, tile]  = sum_{j in tile} (v - u)^2             float32 [R, tiles over E]
    g_v[r, j]        = 2 w_a (v - u)                         the gradient of sum_r w_a ||v - u||^2

``v`` and ``u`` never reach memory. ``g_v`` is *unnormalised*: the reduction's global factor
``1 / (M E denominator)`` (and the upstream gradient) is applied once, in float32, to the weight
gradients at the end (``fused_loss``), so ``g_v`` and everything derived from it stay O(1) -- safe in
float16 whatever the anchor count. The per-row squared errors of the E tiles are summed by the caller
in a fixed order (no atomics).
"""
import torch
import triton
import triton.language as tl

from sfr_kernels.flow_draws import anchor_of, draw_key, flow_source
from sfr_kernels.matmul import matmul_tile, output_tile


@triton.jit
def output_loss_kernel(
    a_ptr, w_ptr, bias_ptr, key_ptr, noise_ptr, target_ptr, weight_ptr, grad_v_ptr, row_sq_ptr,
    R, E, K, M, stride_a, stride_target, source_std,
    EXPLICIT_NOISE: tl.constexpr, HAS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of ``v``: writes ``row_sq[:, tile_n]`` and (WRITE_GRAD) ``g_v``."""
    tile_m, tile_n, rows, cols, row_mask, col_mask = output_tile(R, E, BLOCK_M, BLOCK_N, GROUP_M)
    acc = matmul_tile(a_ptr, w_ptr, rows, cols, row_mask, col_mask, 0, K, stride_a, 1, 1, K,
                      BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)

    # The epilogue (which regenerates x0: register-hungry) works on the two column halves in turn.
    left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    half_cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N // 2)
    seed, first_row = draw_key(key_ptr)
    row_sq = _loss_epilogue(left, rows, half_cols, row_mask, E, M, w_ptr, bias_ptr, seed, first_row, noise_ptr,
                            target_ptr, weight_ptr, grad_v_ptr, stride_target, source_std, EXPLICIT_NOISE, HAS_WEIGHT,
                            WRITE_GRAD)
    row_sq += _loss_epilogue(right, rows, half_cols + BLOCK_N // 2, row_mask, E, M, w_ptr, bias_ptr, seed, first_row,
                             noise_ptr, target_ptr, weight_ptr, grad_v_ptr, stride_target, source_std, EXPLICIT_NOISE,
                             HAS_WEIGHT, WRITE_GRAD)
    tl.store(row_sq_ptr + rows * tl.cdiv(E, BLOCK_N) + tile_n, row_sq, mask=row_mask)


@triton.jit
def _loss_epilogue(acc, rows, cols, row_mask, E, M, w_ptr, bias_ptr, seed, first_row, noise_ptr, target_ptr,
                   weight_ptr, grad_v_ptr, stride_target, source_std, EXPLICIT_NOISE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   WRITE_GRAD: tl.constexpr):
    """``v = acc + b_o``; stores ``g_v`` for the columns ``cols``; returns their ``sum_j (v - u)^2`` per row."""
    col_mask = cols < E
    mask = row_mask[:, None] & col_mask[None, :]
    anchors = anchor_of(rows, M)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    v = (acc + bias[None, :]).to(w_ptr.dtype.element_ty).to(tl.float32)  # the head outputs v in its dtype
    x0 = flow_source(seed, first_row, noise_ptr, rows, cols, mask, E, source_std, EXPLICIT_NOISE)
    y = tl.load(target_ptr + anchors[:, None] * stride_target + cols[None, :], mask=mask, other=0.0)
    diff = tl.where(mask, v - (y.to(tl.float32) - x0), 0.0)
    if WRITE_GRAD:  # off without autograd (evaluation): then only the loss is computed
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + anchors, mask=row_mask, other=0.0).to(tl.float32)
            grad = (2.0 * w)[:, None] * diff
        else:
            grad = 2.0 * diff
        tl.store(grad_v_ptr + rows[:, None] * E + cols[None, :], grad.to(grad_v_ptr.dtype.element_ty), mask=mask)
    return tl.sum(diff * diff, axis=1)


def output_loss(act, out_weight, out_bias, key, noise, target, weight, num_samples, source_std, write_grad,
                precision, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`output_loss_kernel`: ``(row_sq [R] float32, g_v [R, E] in the head's dtype)``.

    ``g_v`` is an empty tensor without ``write_grad``.
    """
    rows, width = act.shape
    embed = out_weight.shape[0]
    tiles_n = triton.cdiv(embed, config["BLOCK_N"])
    row_sq = torch.empty((rows, tiles_n), dtype=torch.float32, device=act.device)
    grad_v = torch.empty((rows, embed) if write_grad else (0,), dtype=out_weight.dtype, device=act.device)
    if rows:
        grid = (triton.cdiv(rows, config["BLOCK_M"]) * tiles_n,)
        output_loss_kernel[grid](
            act, out_weight, out_bias, key, noise, target, weight, grad_v, row_sq, rows, embed, width,
            num_samples, act.stride(0), target.stride(0), float(source_std),
            EXPLICIT_NOISE=noise is not None, HAS_WEIGHT=weight is not None, WRITE_GRAD=write_grad,
            DOT_PRECISION=precision, **config)
    return row_sq.sum(dim=1), grad_v
