"""Output layer of the flow head fused with the loss and its gradient (gradient-in-forward).

For a tile of rows ``r = a*M + m`` (anchor a, sample m), given the last pre-activation ``z_L``
[R, Hd] of the head::

    v[r]      = W_o silu(z_L[r]) + b_o                        [E]   (registers only)
    u[r]      = y[a] - x0[r]                                  [E]   (x0 regenerated from the seed)
    row_sq[r] = || v[r] - u[r] ||^2                           [R]   float32, written
    g_v[r]    = 2 * coef[a] * (v[r] - u[r])                   [R, E] written: dL/dv for dL_out = 1

where ``coef[a] = w_a / (M * E * denominator)`` is the derivative of the reduced loss with respect
to the row's squared error (``denominator = sum w`` for "mean", 1 for "sum"; computed on the device).
``v`` and ``u`` never reach memory; ``g_v`` is what backward needs (``dW_o``/``db_o`` are formed
from it in the forward pass, and ``dL/da_L = g_v W_o``). The program owns whole rows (it loops over
all E tiles), so the per-row loss needs no cross-program reduction.
"""
import triton
import triton.language as tl

from sfr_kernels.flow_draws import flow_source


@triton.jit
def flow_output_loss_kernel(
    seed_ptr, noise_ptr, target_ptr, z_ptr, wo_ptr, bo_ptr, coef_ptr, grad_v_ptr, row_sq_ptr,
    R, M, E, HD, stride_target, source_std,
    EXPLICIT_NOISE: tl.constexpr, WRITE_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid ``(cdiv(R, BLOCK_R),)``; writes ``row_sq`` [R] and (WRITE_GRAD) ``g_v`` [R, E] for its rows."""
    seed = tl.load(seed_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    anchors = rows // M
    w_dtype = wo_ptr.dtype.element_ty
    coef = tl.load(coef_ptr + anchors, mask=row_mask, other=0.0)
    row_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)

    for e0 in range(0, E, BLOCK_E):
        cols_e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        e_mask = cols_e < E
        tile_mask = row_mask[:, None] & e_mask[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
        for k0 in range(0, HD, BLOCK_K):
            cols_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_mask = cols_k < HD
            z = tl.load(z_ptr + rows[:, None] * HD + cols_k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            a = (z * tl.sigmoid(z)).to(w_dtype)  # silu, rounded like the head's activation
            w = tl.load(wo_ptr + cols_e[None, :] * HD + cols_k[:, None],
                        mask=k_mask[:, None] & e_mask[None, :], other=0.0)  # W_o^T tile [BLOCK_K, BLOCK_E]
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        bias = tl.load(bo_ptr + cols_e, mask=e_mask, other=0.0).to(tl.float32)
        v = (acc + bias[None, :]).to(w_dtype).to(tl.float32)  # the head outputs v in its dtype

        x0 = flow_source(seed, noise_ptr, rows, cols_e, tile_mask, E, source_std, EXPLICIT_NOISE)
        y = tl.load(target_ptr + anchors[:, None] * stride_target + cols_e[None, :], mask=tile_mask, other=0.0)
        diff = tl.where(tile_mask, v - (y.to(tl.float32) - x0), 0.0)
        row_sq += tl.sum(diff * diff, axis=1)
        if WRITE_GRAD:  # off without autograd (evaluation): then only the loss is computed
            grad_v = (2.0 * coef[:, None]) * diff
            tl.store(grad_v_ptr + rows[:, None] * E + cols_e[None, :], grad_v.to(grad_v_ptr.dtype.element_ty),
                     mask=tile_mask)

    tl.store(row_sq_ptr + rows, row_sq, mask=row_mask)
