"""Weight (and bias) gradients of the head's layers: ``dW = dZ^T A`` and ``db = sum_r dZ`` over all rows.

For a layer ``z = A W^T + b`` with ``dZ`` [R, Nout] and its input ``A`` [R, Nin]::

    dW[i, j] = sum_r dZ[r, i] A[r, j]          [Nout, Nin], float32
    db[i]    = sum_r dZ[r, i]                  [Nout],      float32  (BIAS_GRAD)

The sum over the R rows is split into ``S`` fixed row ranges (enough programs to fill the GPU when
``Nout x Nin`` alone has too few tiles); program ``(tile, k)`` writes the float32 partial of range k,
and the caller adds the S partials in a fixed order -- no atomics, so the result is bit-reproducible.
The bias sum is taken by the programs of the first column tile only, from the same rows of ``dZ``
(the bias gradient costs one extra read of ``dZ``, not an extra pass over it per column tile).
"""
import torch
import triton
import triton.language as tl

from sfr_kernels.launch import LaunchConfigs, sm_count, weight_grad_splits
from sfr_kernels.matmul import grouped_tile, matmul_tile


@triton.jit
def weight_grad_kernel(
    dz_ptr, a_ptr, partial_ptr, bias_partial_ptr, R, NOUT, NIN, rows_per_split, stride_dz, stride_a,
    BIAS_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid ``(tiles of [NOUT, NIN], S)``: the partial ``dZ^T A`` (and ``sum dZ``) of one row range."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), NOUT, NIN, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1).to(tl.int64)
    outs = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ins = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = outs < NOUT
    in_mask = ins < NIN
    k_start = split * rows_per_split
    k_end = tl.minimum(k_start + rows_per_split, R)
    # A-operand [out, r] = dZ[r, out] (transposed read), B-operand [r, in] = A[r, in].
    acc = matmul_tile(dz_ptr, a_ptr, outs, ins, out_mask, in_mask, k_start, k_end, 1, stride_dz, stride_a, 1,
                      BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    tl.store(partial_ptr + split * NOUT * NIN + outs[:, None] * NIN + ins[None, :], acc,
             mask=out_mask[:, None] & in_mask[None, :])

    if BIAS_GRAD:
        if tile_n == 0:
            sums = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                dz = tl.load(dz_ptr + ks[None, :] * stride_dz + outs[:, None],
                             mask=out_mask[:, None] & (ks < k_end)[None, :], other=0.0)
                sums += tl.sum(dz.to(tl.float32), axis=1)
            tl.store(bias_partial_ptr + split * NOUT + outs, sums, mask=out_mask)


def weight_grad(dz, a, precision, configs: LaunchConfigs, bias: bool = False):
    """``(dZ^T A [Nout, Nin], sum_r dZ [Nout] or None)``, float32, for ``dz`` [R, Nout] and ``a`` [R, Nin]."""
    rows, nout = dz.shape
    nin = a.shape[1]
    config = configs.weight_grad
    tiles = triton.cdiv(nout, config["BLOCK_M"]) * triton.cdiv(nin, config["BLOCK_N"])
    splits, rows_per_split = weight_grad_splits(rows, tiles, configs, sm_count(dz.device))
    partial = torch.empty((splits, nout, nin), dtype=torch.float32, device=dz.device)
    bias_partial = torch.empty((splits, nout) if bias else (0,), dtype=torch.float32, device=dz.device)
    if rows == 0:
        partial.zero_()
        bias_partial.zero_()
    else:
        weight_grad_kernel[(tiles, splits)](
            dz, a, partial, bias_partial, rows, nout, nin, rows_per_split, dz.stride(0), a.stride(0),
            BIAS_GRAD=bias, DOT_PRECISION=precision, **config)
    return partial.sum(dim=0), (bias_partial.sum(dim=0) if bias else None)
