"""In-register regeneration of the flow-matching draws, shared by every fused kernel.

These ``@triton.jit`` helpers rebuild, for a tile of (anchor, sample) rows ``r = a*M + m``, exactly
what the reference draws (DESIGN.md section 2; ``sfr_kernels.reference``)::

    x0[r, j] = source_std * randn(seed, r*E + j)          (or the explicit noise, loaded)
    s[r]     = rand(seed + 1, r)                          uniform       (TIME_MODE == 1)
             = sigmoid(time_mean + time_std * randn(seed + 1, r))  logit_normal (TIME_MODE == 2)
             = 0                                          zero          (TIME_MODE == 3)
             = time[r]                                    explicit time (TIME_MODE == 0)
    x_s      = (1 - s) * x0 + s * y[a]                    conditional OT path
    u        = y[a] - x0                                  target velocity
    e_s[f]   = cos(freq[f] * s)  for f <  F/2             timestep features (FlowHead docstring)
             = sin(freq[f - F/2] * s)  for F/2 <= f < F

so x0, x_s, u and e_s never touch global memory. Row and column indices are int64 tensors, so
``r*E + j`` cannot overflow int32 even when ``N*M*E > 2**31``. All arithmetic is float32.
"""
import triton
import triton.language as tl

# TIME_MODE codes (tl.constexpr): keep in sync with fused_loss._TIME_MODES.
TIME_EXPLICIT = 0
TIME_UNIFORM = 1
TIME_LOGIT_NORMAL = 2
TIME_ZERO = 3


@triton.jit
def flow_time(seed, time_ptr, rows, row_mask, time_mean, time_std, TIME_MODE: tl.constexpr):
    """Flow time ``s`` of each row, float32 [BLOCK_R]; the time stream uses key ``seed + 1``."""
    if TIME_MODE == 0:
        s = tl.load(time_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    elif TIME_MODE == 1:
        s = tl.rand(seed + 1, rows)
    elif TIME_MODE == 2:
        s = tl.sigmoid(time_mean + time_std * tl.randn(seed + 1, rows))
    else:
        s = tl.zeros(rows.shape, dtype=tl.float32)
    return s


@triton.jit
def flow_source(seed, noise_ptr, rows, cols, mask, E, source_std, EXPLICIT_NOISE: tl.constexpr):
    """Source ``x0`` of a [BLOCK_R, BLOCK_C] tile (rows ``r``, embedding dims ``j``), float32.

    Masked-out elements are 0 with explicit noise and finite Philox draws otherwise; callers mask
    whatever they accumulate.
    """
    offsets = rows[:, None] * E + cols[None, :]  # int64: (a*M + m)*E + j
    if EXPLICIT_NOISE:
        x0 = tl.load(noise_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        x0 = source_std * tl.randn(seed, offsets)
    return x0


@triton.jit
def flow_point(seed, noise_ptr, target_ptr, stride_target, s, rows, anchors, cols, mask, E, source_std,
               EXPLICIT_NOISE: tl.constexpr):
    """``x_s = (1 - s) x0 + s y`` for a [BLOCK_R, BLOCK_C] tile, float32, 0 where masked out."""
    x0 = flow_source(seed, noise_ptr, rows, cols, mask, E, source_std, EXPLICIT_NOISE)
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
