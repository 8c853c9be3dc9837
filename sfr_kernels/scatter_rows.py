"""Deterministic scatter-add of anchor rows back into the hidden-state gradient.

``out[p, :] = sum_{i : index[i] == p} src[i, :]`` for an index with duplicates, without
float atomics: the caller sorts ``index`` stably (``sorted_index``, ``order``), so the rows of one
destination form a contiguous run; the first program of each run sums the run in sorted order
(fixed, hence bit-reproducible) in float32 and writes the destination once. Destinations that no
anchor points to are left as the caller initialised them (zeros).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def scatter_rows_kernel(src_ptr, sorted_index_ptr, order_ptr, out_ptr, N, D, BLOCK_D: tl.constexpr):
    """Grid ``(N, cdiv(D, BLOCK_D))``: program i handles sorted position i, D-tile j.

    ``src`` [N, D], ``out`` [P, D] (row-major).
    """
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    dest = tl.load(sorted_index_ptr + i)
    previous = tl.load(sorted_index_ptr + tl.maximum(i - 1, 0))  # scalar loads stay in bounds
    leader = (i == 0) | (previous != dest)  # only the run's first position writes

    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    j = i
    more = leader
    while more:
        row = tl.load(order_ptr + j)
        acc += tl.load(src_ptr + row * D + cols, mask=col_mask, other=0.0).to(tl.float32)
        j += 1
        following = tl.load(sorted_index_ptr + tl.minimum(j, N - 1))
        more = (j < N) & (following == dest)

    # The scalar `leader` is broadcast to a [BLOCK_D] vector by hand: `col_mask & leader` compiles,
    # but the interpreter (how CI runs this) rejects a mask built from a scalar boolean.
    leader_cols = (tl.zeros((BLOCK_D,), tl.int32) + leader.to(tl.int32)) > 0
    tl.store(out_ptr + dest * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask & leader_cols)


def scatter_anchor_rows(rows: torch.Tensor, anchor_index: torch.Tensor, hidden: torch.Tensor, config: dict):
    """``out[p] = sum_{i: anchor_index[i] = p} rows[i]`` in a fixed order: a new ``[*hidden.shape]`` tensor
    of ``hidden``'s dtype, zero where no anchor points (``rows`` [N, D])."""
    out = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    n, d = rows.shape
    if n == 0:
        return out
    sorted_index, order = torch.sort(anchor_index, stable=True)
    scatter_rows_kernel[(n, triton.cdiv(d, config["BLOCK_D"]))](rows, sorted_index, order, out, n, d, **config)
    return out
