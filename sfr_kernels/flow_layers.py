"""The head's SiLU layers as GEMMs with fused epilogues: forward, and the input-gradient chain.

Forward (``linear_silu_kernel``), for a layer with weight ``W`` [Nout, K]::

    z = A W^T + bias          A [R, K]; bias [Nout] or, per anchor, c [N, Nout] read at row a = r // M
    a = silu(z)               both written, in the head's dtype; silu is evaluated once per element

The first layer is ``A = X = [x_s | e_s]``, ``W = [W_x | W_t]`` and the per-anchor bias ``c = W_c h +
b_c`` (the conditioning, shared by the M rows of an anchor); hidden layer k is ``A = a_k``,
``W = W_k``, ``bias = b_k``. ``z`` is kept for the gradient chain, ``a`` feeds the next GEMM.

Input-gradient chain (``linear_silu_backward_kernel``), for the layer after ``z``::

    dz = (dY W) * silu'(z)    dY [R, Nout] the gradient of that layer's output, W [Nout, Nz]
    a  = silu(z)              optionally: the activation the weight gradient needs, rebuilt
                              from the same sigmoid (one exp per element gives both)

``silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))``. ``dz`` and ``a`` may be written over ``z`` (each
program reads its own tile of ``z`` before writing it, and no other program reads that tile), which
is how the fused op keeps one ``[R, Hd]`` buffer per layer alive. Both kernels are one
``matmul_tile`` (float32 accumulation) plus an epilogue in registers.
"""
import torch
import triton
import triton.language as tl

from sfr_kernels.flow_draws import anchor_of
from sfr_kernels.matmul import matmul_tile, output_tile


@triton.jit
def fast_sigmoid(z):
    """``1 / (1 + exp(-z))`` with the GPU's fast division (``div.full.f32``, 2 ulp) instead of the IEEE one,
    whose denormal slow path costs a dozen instructions and a branch per element; float32."""
    return tl.fdiv(1.0, 1.0 + tl.exp(-z))


@triton.jit
def linear_silu_kernel(
    a_ptr, w_ptr, bias_ptr, z_ptr, act_ptr, R, NOUT, K, M, stride_a, stride_w, stride_bias,
    BIAS_PER_ANCHOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of ``z = A W^T + bias`` and ``a = silu(z)``; 1-D grid over the tiles."""
    tile_m, tile_n, rows, cols, row_mask, col_mask = output_tile(R, NOUT, BLOCK_M, BLOCK_N, GROUP_M)
    acc = matmul_tile(a_ptr, w_ptr, rows, cols, row_mask, col_mask, 0, K, stride_a, 1, 1, stride_w,
                      BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)

    mask = row_mask[:, None] & col_mask[None, :]
    if BIAS_PER_ANCHOR:  # c[a] of the row's anchor a = r // M
        bias = tl.load(bias_ptr + anchor_of(rows, M)[:, None] * stride_bias + cols[None, :], mask=mask, other=0.0)
    else:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    out_dtype = z_ptr.dtype.element_ty
    z = (acc + bias.to(tl.float32)).to(out_dtype)  # the head's pre-activation, in its dtype
    offsets = rows[:, None] * NOUT + cols[None, :]
    tl.store(z_ptr + offsets, z, mask=mask)
    zf = z.to(tl.float32)
    tl.store(act_ptr + offsets, (zf * fast_sigmoid(zf)).to(out_dtype), mask=mask)


@triton.jit
def linear_silu_backward_kernel(
    dy_ptr, w_ptr, z_ptr, dz_ptr, act_ptr, anchor_sum_ptr, R, NZ, K, stride_dy, stride_w,
    STORE_ACTIVATION: tl.constexpr, ANCHOR_SAMPLES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One tile of ``dz = (dY W) * silu'(z)`` (and ``a = silu(z)``); 1-D grid over the [R, NZ] tiles.

    ``ANCHOR_SAMPLES = M > 0`` (a power of two dividing BLOCK_M) also writes the float32 sums of each
    anchor's M rows, ``anchor_sum[a] = sum_m dz[a*M + m]`` (the conditioning's gradient ``dc``): a
    tile holds whole anchors, so they need no other program.
    """
    tile_m, tile_n, rows, cols, row_mask, col_mask = output_tile(R, NZ, BLOCK_M, BLOCK_N, GROUP_M)
    acc = matmul_tile(dy_ptr, w_ptr, rows, cols, row_mask, col_mask, 0, K, stride_dy, 1, stride_w, 1,
                      BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)

    # The epilogue works on the two column halves in turn: half the registers are live at a time.
    left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    half_cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N // 2)
    first_anchor = tile_m.to(tl.int64) * (BLOCK_M // ANCHOR_SAMPLES) if ANCHOR_SAMPLES > 0 else 0
    _silu_grad_store(left, rows, half_cols, row_mask, R, NZ, z_ptr, dz_ptr, act_ptr, anchor_sum_ptr, first_anchor,
                     STORE_ACTIVATION, ANCHOR_SAMPLES, BLOCK_M)
    _silu_grad_store(right, rows, half_cols + BLOCK_N // 2, row_mask, R, NZ, z_ptr, dz_ptr, act_ptr, anchor_sum_ptr,
                     first_anchor, STORE_ACTIVATION, ANCHOR_SAMPLES, BLOCK_M)


@triton.jit
def _silu_grad_store(acc, rows, cols, row_mask, R, NZ, z_ptr, dz_ptr, act_ptr, anchor_sum_ptr, first_anchor,
                     STORE_ACTIVATION: tl.constexpr, ANCHOR_SAMPLES: tl.constexpr, BLOCK_M: tl.constexpr):
    """Stores ``dz = acc * silu'(z)`` (and ``silu(z)``, the anchor sums) for the columns ``cols`` of ``rows``."""
    col_mask = cols < NZ
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows[:, None] * NZ + cols[None, :]
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # read before anything is written over it
    sig = fast_sigmoid(z)
    dz = acc * sig * (1.0 + z * (1.0 - sig))  # 0 in masked-off rows (acc and z are)
    tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if STORE_ACTIVATION:
        tl.store(act_ptr + offsets, (z * sig).to(act_ptr.dtype.element_ty), mask=mask)
    if ANCHOR_SAMPLES > 0:
        per_anchor = tl.sum(tl.reshape(dz, (BLOCK_M // ANCHOR_SAMPLES, ANCHOR_SAMPLES, dz.shape[1])), axis=1)
        anchors = first_anchor + tl.arange(0, BLOCK_M // ANCHOR_SAMPLES).to(tl.int64)
        tl.store(anchor_sum_ptr + anchors[:, None] * NZ + cols[None, :], per_anchor,
                 mask=(anchors < R // ANCHOR_SAMPLES)[:, None] & col_mask[None, :])


def _grid(rows: int, cols: int, config: dict) -> tuple[int]:
    return (triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"]),)


def linear_silu(a, weight, bias, z_out, samples_per_anchor, precision, config) -> torch.Tensor:
    """Launch :func:`linear_silu_kernel`: writes ``z_out = a W^T + bias`` [R, Nout], returns ``silu(z_out)``.

    ``bias`` is ``[Nout]``, or ``[N, Nout]`` (one row per anchor, ``R = N * samples_per_anchor``).
    """
    rows, k = a.shape
    nout = weight.shape[0]
    act = torch.empty_like(z_out)
    if rows:
        linear_silu_kernel[_grid(rows, nout, config)](
            a, weight, bias, z_out, act, rows, nout, k, samples_per_anchor, a.stride(0), weight.stride(0),
            bias.stride(0), BIAS_PER_ANCHOR=bias.dim() == 2, DOT_PRECISION=precision, **config)
    return act


def linear_silu_backward(dy, weight, z, dz_out, precision, config, act_out=None, samples_per_anchor=0):
    """Launch :func:`linear_silu_backward_kernel`: ``dz_out = (dy W) * silu'(z)`` [R, Nz]; with
    ``act_out``, also ``act_out = silu(z)``. ``dz_out`` or ``act_out`` may be ``z`` itself (in place).

    With ``samples_per_anchor = M``, also returns ``sum_m dz_out[a*M + m]`` [R/M, Nz] float32 (None if 0).
    It is formed in the epilogue when M is a power of two that divides BLOCK_M, else by torch.
    """
    rows, k = dy.shape
    nz = weight.shape[1]
    m = samples_per_anchor
    fused = m > 0 and config["BLOCK_M"] % m == 0 and (m & (m - 1)) == 0
    sums = torch.empty((rows // m, nz), dtype=torch.float32, device=dy.device) if fused else None
    if rows:
        linear_silu_backward_kernel[_grid(rows, nz, config)](
            dy, weight, z, dz_out, act_out if act_out is not None else dz_out, sums, rows, nz, k, dy.stride(0),
            weight.stride(0), STORE_ACTIVATION=act_out is not None, ANCHOR_SAMPLES=m if fused else 0,
            DOT_PRECISION=precision, **config)
    if m > 0 and not fused:
        sums = dz_out.view(rows // m, m, nz).sum(dim=1, dtype=torch.float32)  # the M rows of an anchor are contiguous
    return sums
