"""The tiled GEMM main loop every fused SFR kernel is built on (tensor cores via ``tl.dot``).

``matmul_tile`` computes one ``[BLOCK_M, BLOCK_N]`` tile of ``A @ B`` in float32 for operands given
by pointer and strides, so the same loop serves ``x W^T`` (a ``nn.Linear`` forward: ``B = W^T``,
``stride_bk = 1``), ``dz W`` (its input gradient) and ``dz^T a`` (its weight gradient: ``A = dz^T``,
``stride_am = 1``). The caller's epilogue then works on the tile in registers, so elementwise work
(biases, activations, the loss) is done once per output element, never once per K step.

``grouped_tile`` orders a 1-D grid of output tiles in groups of ``GROUP_M`` tile rows (the usual L2
swizzle of Triton's matmul tutorial): neighbouring programs share A rows and B columns in L2.

Offsets are int64 (``rows``/``cols`` come in as int64), so operands larger than 2**31 elements are
addressed correctly. Loads are masked at the M/N edges and at the K tail; masked elements are 0 and
add nothing to the tile.
"""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(tile_m, tile_n)`` of program ``pid`` in a grid of ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)`` programs."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_size
    tile_n = (pid % per_group) // group_size
    return tile_m, tile_n


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile: ``(tile_n, rows, cols, row_mask, col_mask)``, rows/cols int64."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tile_m, tile_n, rows, cols, rows < M, cols < N


@triton.jit
def matmul_tile(a_ptr, b_ptr, rows, cols, row_mask, col_mask, k_start, k_end,
                stride_am, stride_ak, stride_bk, stride_bn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """``sum_{k_start <= k < k_end} A[rows, k] B[k, cols]``: float32 ``[BLOCK_M, BLOCK_N]``.

    ``A[i, k]`` is at ``a_ptr + i*stride_am + k*stride_ak``, ``B[k, j]`` at ``b_ptr + k*stride_bk +
    j*stride_bn``; both are read in their own dtype (bf16/fp16 on tensor cores, fp32 as
    ``DOT_PRECISION``) and accumulated in float32.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = ks < k_end
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc
