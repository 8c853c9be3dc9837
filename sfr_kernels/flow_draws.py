"""The flow-matching draws and the head's input, generated once: ``X = [x_s | e_s]``.

For the (anchor, sample) rows ``r = a*M + m``, exactly what the reference draws (docs/design.md,
"Random draws (Philox layout)"; ``sfr_kernels.reference``), with ``g = r0 + r`` the row's place in the
draw layout (``r0 = anchor_offset * M``; 0 unless the caller's anchors continue another call's)::

    x0[r, j] = source_std * randn(seed, g*E + j)          (or the explicit noise, loaded)
    s[r]     = rand(seed + 1, g)                          uniform       (TIME_MODE 1)
             = sigmoid(time_mean + time_std * randn(seed + 1, g))  logit_normal (TIME_MODE 2)
             = 0                                          zero          (TIME_MODE 3)
             = time[r]                                    explicit time (TIME_MODE 0)
    x_s      = (1 - s) * x0 + s * y[a]                    conditional OT path
    u        = y[a] - x0                                  target velocity
    e_s[f]   = cos(freq[f] * s)  for f <  F/2             timestep features (FlowHead docstring)
             = sin(freq[f - F/2] * s)  for F/2 <= f < F

``flow_inputs_kernel`` writes ``X[r] = [x_s[r], e_s[r]]`` ([R, E + F], the head's dtype) once per
forward pass: every source draw and every time feature is evaluated once, and the first layer of the
head becomes one GEMM, ``z1 = X [W_x | W_t]^T + c[a]`` (``flow_layers``). The ``@triton.jit``
helpers are shared with the output layer, which regenerates ``x0`` once more for ``u`` in its loss
epilogue (``flow_output``) -- cheaper in memory than keeping an ``[R, E]`` float32 ``u`` alive.

Row and column indices are int64, so ``r*E + j`` cannot overflow int32 even when ``N*M*E > 2**31``.
All arithmetic is float32; values are rounded to the head's dtype where the reference rounds them
(the head's inputs ``x_s``, ``s`` and ``e_s``).
"""
import torch
import triton
import triton.language as tl

from sfr_kernels.reference import TIME_MODES

_EXPLICIT = tl.constexpr(TIME_MODES["explicit"])
_UNIFORM = tl.constexpr(TIME_MODES["uniform"])
_LOGIT_NORMAL = tl.constexpr(TIME_MODES["logit_normal"])
_ZERO = tl.constexpr(TIME_MODES["zero"])


@triton.jit
def anchor_of(rows, M):
    """The anchor ``a = r // M`` of each (int64) row index, as int64. The division is done in int32 (a
    64-bit one is a ~70-instruction subroutine): rows stay below 2**31, the launcher checks it."""
    return (rows.to(tl.int32) // M).to(tl.int64)


@triton.jit
def draw_key(key_ptr):
    """``(seed, first_row)`` from the int64 [2] draw key on the device (no host sync, CUDA-graph safe)."""
    return tl.load(key_ptr), tl.load(key_ptr + 1)


@triton.jit
def flow_time(seed, first_row, time_ptr, rows, row_mask, time_mean, time_std, TIME_MODE: tl.constexpr):
    """Flow time ``s`` of each row, float32 [BLOCK_R]; the time stream uses key ``seed + 1``, at the
    rows' places ``first_row + r`` in the draw layout (explicit time is indexed by ``r``)."""
    if TIME_MODE == _EXPLICIT:
        s = tl.load(time_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    elif TIME_MODE == _UNIFORM:
        s = tl.rand(seed + 1, first_row + rows)
    elif TIME_MODE == _LOGIT_NORMAL:
        s = tl.sigmoid(time_mean + time_std * tl.randn(seed + 1, first_row + rows))
    else:
        s = tl.zeros(rows.shape, dtype=tl.float32)
    return s


@triton.jit
def flow_source(seed, first_row, noise_ptr, rows, cols, mask, E, source_std, EXPLICIT_NOISE: tl.constexpr):
    """Source ``x0`` of a [BLOCK_R, BLOCK_C] tile (rows ``r``, embedding dims ``j``), float32.

    Masked-out elements are 0 with explicit noise and finite Philox draws otherwise; callers mask
    whatever they accumulate.
    """
    if EXPLICIT_NOISE:
        x0 = tl.load(noise_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        offsets = (first_row + rows)[:, None] * E + cols[None, :]  # int64: ((o + a)*M + m)*E + j
        x0 = source_std * tl.randn(seed, offsets)
    return x0


@triton.jit
def flow_point(seed, first_row, noise_ptr, target_ptr, stride_target, s, rows, anchors, cols, mask, E, source_std,
               EXPLICIT_NOISE: tl.constexpr):
    """``x_s = (1 - s) x0 + s y`` for a [BLOCK_R, BLOCK_C] tile, float32, 0 where masked out."""
    x0 = flow_source(seed, first_row, noise_ptr, rows, cols, mask, E, source_std, EXPLICIT_NOISE)
    y = tl.load(target_ptr + anchors[:, None] * stride_target + cols[None, :], mask=mask, other=0.0)
    s2 = s[:, None]
    x_s = (1 - s2) * x0 + s2 * y.to(tl.float32)
    return tl.where(mask, x_s, 0.0)


@triton.jit
def time_for_features(s, w_dtype: tl.constexpr, freq_ptr):
    """The time as the head sees it when it evaluates its features: ``s`` rounded to the head's dtype
    ``w_dtype``, then float32 -- except with float32 frequencies and 16-bit weights, which is a float32
    head under autocast (the launcher casts its weights): there ``s`` stays float32, as in the reference.
    """
    if freq_ptr.dtype.element_ty == tl.float32:
        return s
    return s.to(w_dtype).to(tl.float32)


@triton.jit
def time_features(s_feat, freq_ptr, cols, row_mask, F):
    """``e_s`` for a [BLOCK_R, BLOCK_C] tile of feature columns ``cols`` (< F), float32, 0 where masked.

    ``s_feat`` is the time as the head sees it (rounded to the head's dtype, then float32), so the
    angles ``freq * s`` are the very float32 numbers the reference evaluates.
    """
    half = F // 2
    col_mask = cols < F
    is_sin = cols >= half
    k = tl.where(is_sin, cols - half, cols)
    # The head's buffer follows head.to(dtype): upcast exactly as torch promotes it in the reference.
    freq = tl.load(freq_ptr + k, mask=col_mask, other=0.0).to(tl.float32)
    angles = s_feat[:, None] * freq[None, :]
    feats = tl.where(is_sin[None, :], tl.sin(angles), tl.cos(angles))
    return tl.where(row_mask[:, None] & col_mask[None, :], feats, 0.0)


@triton.jit
def flow_inputs_kernel(
    key_ptr, noise_ptr, time_ptr, target_ptr, freq_ptr, x_ptr,
    R, M, E, F, stride_target, stride_x, source_std, time_mean, time_std,
    TIME_MODE: tl.constexpr, EXPLICIT_NOISE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """``X[r, :E] = x_s[r]``, ``X[r, E:E+F] = e_s[r]`` for BLOCK_R rows; grid ``(cdiv(R, BLOCK_R),)``."""
    seed, first_row = draw_key(key_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    anchors = anchor_of(rows, M)
    x_dtype = x_ptr.dtype.element_ty

    s = flow_time(seed, first_row, time_ptr, rows, row_mask, time_mean, time_std, TIME_MODE)
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        mask = row_mask[:, None] & (cols < E)[None, :]
        x_s = flow_point(seed, first_row, noise_ptr, target_ptr, stride_target, s, rows, anchors, cols, mask, E,
                         source_std, EXPLICIT_NOISE)
        tl.store(x_ptr + rows[:, None] * stride_x + cols[None, :], x_s.to(x_dtype), mask=mask)

    s_feat = time_for_features(s, x_dtype, freq_ptr)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F).to(tl.int64)
        if TIME_MODE == _ZERO:  # s = 0 (the MTP preset): cos 0 = 1 and sin 0 = 0 exactly, no sin/cos to evaluate
            feats = tl.where(row_mask[:, None] & (cols < F // 2)[None, :], 1.0, 0.0)
        else:
            feats = time_features(s_feat, freq_ptr, cols, row_mask, F)
        tl.store(x_ptr + rows[:, None] * stride_x + E + cols[None, :], feats.to(x_dtype),
                 mask=row_mask[:, None] & (cols < F)[None, :])


def draw_flow_inputs(key, noise, time, target, time_frequencies, num_samples, source_std, time_mode,
                     time_mean, time_std, dtype, config) -> torch.Tensor:
    """Launch :func:`flow_inputs_kernel`: ``X = [x_s | e_s]``, ``[N*M, E + F]`` in ``dtype``.

    ``key`` the int64 [2] draw key ``(seed, anchor_offset * M)`` on the device (``fused_loss.draw_key``),
    ``target`` [N, E] (rows may be strided), ``noise`` [N, M, E] or None, ``time`` [N, M] or None,
    ``time_frequencies`` [F/2]; ``time_mode`` a value of ``reference.TIME_MODES``.
    """
    n, embed = target.shape
    features = 2 * time_frequencies.shape[0]
    rows = n * num_samples
    x = torch.empty((rows, embed + features), dtype=dtype, device=target.device)
    if rows:
        flow_inputs_kernel[(triton.cdiv(rows, config["BLOCK_R"]),)](
            key, noise, time, target, time_frequencies, x, rows, num_samples, embed, features, target.stride(0),
            x.stride(0), float(source_std), float(time_mean), float(time_std),
            TIME_MODE=time_mode, EXPLICIT_NOISE=noise is not None, **config)
    return x
