"""Input layer of the flow head, fused with the draws: forward and weight gradients.

Forward (``flow_input_forward_kernel``), for rows ``r = a*M + m`` of the (anchor, sample) grid::

    z1[r, :] = W_x x_s[r] + W_t e_s[r] + c[a]          z1: [R, Hd], R = N*M

with ``x_s``/``e_s`` generated in registers (``flow_draws``) and ``c = W_c h + b_c`` [N, Hd]
computed once per anchor (cuBLAS) and read by its M rows. Only ``z1`` is written.

Backward (``flow_input_weight_grad_kernel``), given ``dz1 = dL/dz1`` [R, Hd]::

    dW_x = dz1^T x_s  [Hd, E]        dW_t = dz1^T e_s  [Hd, F]

again regenerating ``x_s``/``e_s`` from the seed. The sum over R is split into ``S`` fixed row
ranges; each program writes its float32 partial ``[S, Hd, C]`` and the caller sums the S partials
in a fixed order (no atomics), so the result is bit-reproducible.

Inputs may be float32/bfloat16/float16: tiles are generated in float32, rounded to the weights'
dtype exactly where the reference rounds (the head's input ``x_s``, ``s`` and ``e_s``), and every
``tl.dot`` accumulates in float32.
"""
import triton
import triton.language as tl

from sfr_kernels.flow_draws import flow_point, flow_time, time_features, time_for_features


@triton.jit
def flow_input_forward_kernel(
    seed_ptr, noise_ptr, time_ptr, target_ptr, cond_ptr, wx_ptr, wt_ptr, freq_ptr, z_ptr,
    R, M, E, F, HD, stride_target, source_std, time_mean, time_std,
    TIME_MODE: tl.constexpr, EXPLICIT_NOISE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One [BLOCK_R, BLOCK_H] tile of ``z1``; grid ``(cdiv(R, BLOCK_R), cdiv(Hd, BLOCK_H))``."""
    seed = tl.load(seed_ptr)  # device seed: no host sync, CUDA-graph safe
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols_h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < R
    h_mask = cols_h < HD
    anchors = rows // M
    w_dtype = wx_ptr.dtype.element_ty

    s = flow_time(seed, time_ptr, rows, row_mask, time_mean, time_std, TIME_MODE)
    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)

    # W_x x_s: K-loop over the embedding dimension.
    for e0 in range(0, E, BLOCK_E):
        cols_e = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        e_mask = cols_e < E
        x_s = flow_point(seed, noise_ptr, target_ptr, stride_target, s, rows, anchors, cols_e,
                         row_mask[:, None] & e_mask[None, :], E, source_std, EXPLICIT_NOISE)
        w = tl.load(wx_ptr + cols_h[None, :] * E + cols_e[:, None],
                    mask=e_mask[:, None] & h_mask[None, :], other=0.0)  # W_x^T tile [BLOCK_E, BLOCK_H]
        acc = tl.dot(x_s.to(w_dtype), w, acc, input_precision=DOT_PRECISION)

    # W_t e_s: the head evaluates the features of s rounded to its dtype; float32 frequencies with
    # 16-bit weights are a float32 head under autocast, where s stays float32.
    s_feat = time_for_features(s, w_dtype, freq_ptr)
    for f0 in range(0, F, BLOCK_F):
        cols_f = f0 + tl.arange(0, BLOCK_F).to(tl.int64)
        f_mask = cols_f < F
        feats = time_features(s_feat, freq_ptr, cols_f, row_mask, F)
        w = tl.load(wt_ptr + cols_h[None, :] * F + cols_f[:, None],
                    mask=f_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(feats.to(w_dtype), w, acc, input_precision=DOT_PRECISION)

    tile_mask = row_mask[:, None] & h_mask[None, :]
    c = tl.load(cond_ptr + anchors[:, None] * HD + cols_h[None, :], mask=tile_mask, other=0.0)
    z = acc + c.to(tl.float32)
    tl.store(z_ptr + rows[:, None] * HD + cols_h[None, :], z.to(z_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def flow_input_weight_grad_kernel(
    seed_ptr, noise_ptr, time_ptr, target_ptr, freq_ptr, dz_ptr, partial_ptr,
    R, M, E, F, HD, rows_per_split, stride_target, source_std, time_mean, time_std,
    TIME_FEATURES: tl.constexpr, TIME_MODE: tl.constexpr, EXPLICIT_NOISE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial ``dz1^T x_s`` (or ``dz1^T e_s`` with TIME_FEATURES) over one row range.

    Grid ``(cdiv(Hd, BLOCK_H), cdiv(C, BLOCK_C), S)`` with ``C = F if TIME_FEATURES else E``; program
    ``(i, j, k)`` reduces rows ``[k*rows_per_split, (k+1)*rows_per_split)`` and writes
    ``partial[k, i-tile, j-tile]`` (float32 [S, Hd, C]): every element is written exactly once.
    """
    seed = tl.load(seed_ptr)
    cols_h = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2).to(tl.int64)
    h_mask = cols_h < HD
    if TIME_FEATURES:
        C = F
    else:
        C = E
    c_mask = cols_c < C
    dz_dtype = dz_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, R)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = rows < row_end
        s = flow_time(seed, time_ptr, rows, row_mask, time_mean, time_std, TIME_MODE)
        if TIME_FEATURES:
            feats = time_features(time_for_features(s, dz_dtype, freq_ptr), freq_ptr, cols_c, row_mask, F)
        else:
            feats = flow_point(seed, noise_ptr, target_ptr, stride_target, s, rows, rows // M, cols_c,
                               row_mask[:, None] & c_mask[None, :], E, source_std, EXPLICIT_NOISE)
        dz = tl.load(dz_ptr + rows[:, None] * HD + cols_h[None, :],
                     mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(dz), feats.to(dz_dtype), acc, input_precision=DOT_PRECISION)

    out = partial_ptr + split * HD * C + cols_h[:, None] * C + cols_c[None, :]
    tl.store(out, acc, mask=h_mask[:, None] & c_mask[None, :])
