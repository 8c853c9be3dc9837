"""In-kernel draws (sfr_kernels.flow_draws) and the deterministic anchor scatter, tested directly.

The draws are checked at row indices far beyond int32 (``r*E + j > 2**32``), which the end-to-end
tests cannot reach on a CPU: if any offset were computed in int32 it would wrap and the numbers
would differ from the int64 Philox layout (docs/design.md, "Random draws (Philox layout)").
"""
import os

import pytest
import torch
import triton
import triton.language as tl

from sfr_kernels import philox, timestep_features, timestep_frequencies
from sfr_kernels.flow_draws import draw_flow_inputs, flow_point, flow_source, flow_time, time_features
from sfr_kernels.fused_loss import draw_key
from sfr_kernels.reference import TIME_MODES, draw_source, draw_time, flow_path
from sfr_kernels.scatter_rows import scatter_anchor_rows

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)",
)


@triton.jit
def _draws_kernel(seed_ptr, noise_ptr, time_ptr, target_ptr, freq_ptr, first_row, num_rows, M, E, F,
                  source_std, time_mean, time_std, x0_ptr, xs_ptr, s_ptr, feat_ptr,
                  TIME_MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    seed = tl.load(seed_ptr)
    local = tl.arange(0, BLOCK_R).to(tl.int64)  # this call's rows; their draws are those of first_row + local
    row_mask = local < num_rows
    cols = tl.arange(0, BLOCK_E).to(tl.int64)
    mask = row_mask[:, None] & (cols < E)[None, :]
    s = flow_time(seed, first_row, time_ptr, local, row_mask, time_mean, time_std, TIME_MODE)
    x0 = flow_source(seed, first_row, noise_ptr, local, cols, mask, E, source_std, False)
    anchors = local // M
    x_s = flow_point(seed, first_row, noise_ptr, target_ptr, E, s, local, anchors, cols, mask, E, source_std, False)
    fcols = tl.arange(0, BLOCK_F).to(tl.int64)
    feats = time_features(s, freq_ptr, fcols, row_mask, F)
    out = local[:, None] * E + cols[None, :]
    tl.store(x0_ptr + out, x0, mask=mask)
    tl.store(xs_ptr + out, x_s, mask=mask)
    tl.store(s_ptr + local, s, mask=row_mask)
    tl.store(feat_ptr + local[:, None] * F + fcols[None, :], feats, mask=row_mask[:, None] & (fcols < F)[None, :])


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal", "zero"])
@pytest.mark.parametrize("row_base", [0, 2**31 // 3 * 3, 2**34 * 3])
def test_draws_match_the_rng_layout_at_int64_offsets(time_sampling, row_base):
    mode = TIME_MODES[time_sampling]
    m, e, f, num_rows, std, mean, tstd = 3, 37, 12, 24, 0.7, 0.3, 1.4
    seed = torch.tensor(2**33 + 17)
    target = torch.randn(num_rows // m, e)
    freq = timestep_frequencies(f)
    x0, xs = torch.full((num_rows, e), float("nan")), torch.full((num_rows, e), float("nan"))
    s, feats = torch.full((num_rows,), float("nan")), torch.full((num_rows, f), float("nan"))
    _draws_kernel[(1,)](seed, None, None, target, freq, row_base, num_rows, m, e, f, std, mean, tstd,
                        x0, xs, s, feats, TIME_MODE=mode, BLOCK_R=32, BLOCK_E=64, BLOCK_F=16)

    rows = row_base + torch.arange(num_rows, dtype=torch.int64)
    offsets = rows[:, None] * e + torch.arange(e)
    assert int(offsets.max()) > 2**32 or row_base == 0
    expected_x0 = std * philox.randn(int(seed), offsets)
    if time_sampling == "uniform":
        expected_s = philox.rand(int(seed) + 1, rows)
    elif time_sampling == "logit_normal":
        expected_s = torch.sigmoid(mean + tstd * philox.randn(int(seed) + 1, rows))
    else:
        expected_s = torch.zeros(num_rows)
    torch.testing.assert_close(x0, expected_x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(s, expected_s, rtol=0, atol=1e-6)
    y = target.repeat_interleave(m, dim=0)
    torch.testing.assert_close(xs, (1 - s[:, None]) * x0 + s[:, None] * y, rtol=0, atol=1e-6)
    torch.testing.assert_close(feats, timestep_features(s, freq), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("explicit_time", [False, True])
@pytest.mark.parametrize("anchor_offset", [0, 11])
def test_flow_inputs_are_the_head_input_of_the_reference(dtype, explicit_time, anchor_offset):
    """X = [x_s | e_s] of every row, rounded to the head's dtype where the reference rounds it: x_s from
    float32, the features of s rounded to the head's dtype (odd E and F: masked tails). Uniform time
    (bit-exact in the Philox port) or an explicit time; the draws of anchors ``anchor_offset + a``."""
    n, m, e, f = 7, 3, 37, 10
    seed, std = torch.tensor(5), 0.9
    target = torch.randn(n, e)
    freq = timestep_frequencies(f).to(dtype)
    s = torch.rand(n, m) if explicit_time else draw_time(seed, n, m, "uniform", "cpu", anchor_offset=anchor_offset)
    mode = TIME_MODES["explicit" if explicit_time else "uniform"]
    key = draw_key(seed, anchor_offset, m, torch.device("cpu"))
    assert key.tolist() == [5, anchor_offset * m]
    x = draw_flow_inputs(key, None, s if explicit_time else None, target, freq, m, std, mode, 0.0, 1.0, dtype,
                         dict(BLOCK_R=16, BLOCK_E=16, BLOCK_F=16))
    x0 = draw_source(seed, n, m, e, std, "cpu", anchor_offset)
    x_s, _ = flow_path(x0, target, s)
    assert x.shape == (n * m, e + f) and x.dtype == dtype
    torch.testing.assert_close(x[:, :e], x_s.reshape(n * m, e).to(dtype), rtol=0, atol=2e-6)
    features = timestep_features(s.reshape(-1).to(dtype), freq).to(dtype)
    torch.testing.assert_close(x[:, e:], features, rtol=0, atol=2e-5 if dtype == torch.float32 else 1e-3)


def _scatter(src, index, num_rows, block_d):
    return scatter_anchor_rows(src, index, torch.empty(num_rows, src.shape[1], dtype=src.dtype), dict(BLOCK_D=block_d))


def test_scatter_rows_accumulates_duplicates_deterministically():
    n, d, num_rows = 40, 70, 12
    src = torch.randn(n, d)
    index = torch.randint(0, num_rows, (n,))
    index[:5] = 3  # a long run of one destination
    out = _scatter(src, index, num_rows, block_d=32)  # 3 column tiles, the last one partial
    expected = torch.zeros(num_rows, d, dtype=torch.float64).index_add_(0, index, src.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    missing = torch.ones(num_rows, dtype=torch.bool)
    missing[index] = False
    assert torch.equal(out[missing], torch.zeros_like(out[missing]))
    assert torch.equal(out, _scatter(src, index, num_rows, block_d=32))
