"""The pure-PyTorch Philox reproduces triton.language.random (run in the interpreter on CPU)."""
import pytest
import torch
import triton
import triton.language as tl

from sfr_kernels import philox


@triton.jit
def _triton_random_kernel(seed, offset_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, uniform_ptr, normal_ptr, n,
                          BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    offset = tl.load(offset_ptr + i, mask=mask)
    w0, w1, w2, w3 = tl.randint4x(seed, offset)
    tl.store(w0_ptr + i, w0, mask=mask)
    tl.store(w1_ptr + i, w1, mask=mask)
    tl.store(w2_ptr + i, w2, mask=mask)
    tl.store(w3_ptr + i, w3, mask=mask)
    tl.store(uniform_ptr + i, tl.rand(seed, offset), mask=mask)
    tl.store(normal_ptr + i, tl.randn(seed, offset), mask=mask)


def _triton_draws(seed: int, offsets: torch.Tensor):
    n = offsets.numel()
    words = [torch.empty(n, dtype=torch.int32, device=offsets.device) for _ in range(4)]
    uniform = torch.full((n,), float("nan"), device=offsets.device)
    normal = torch.full((n,), float("nan"), device=offsets.device)
    _triton_random_kernel[(1,)](seed, offsets, *words, uniform, normal, n, BLOCK=triton.next_power_of_2(n))
    return [w.to(torch.int64) & 0xFFFFFFFF for w in words], uniform, normal


def _offsets(device="cpu"):
    g = torch.Generator().manual_seed(7)
    return torch.cat([
        torch.arange(0, 64),  # small offsets: only the low counter word is used
        torch.randint(2**32, 2**62, (64,), generator=g),  # the high word matters above 2**32
        torch.tensor([2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1]),
    ]).to(device)


@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**32 + 5, 2**40 + 7, 2**63 - 1])
def test_matches_triton_bit_exact(seed):
    offsets = _offsets()
    words, uniform, normal = _triton_draws(seed, offsets)
    for ours, theirs in zip(philox.randint4x(seed, offsets), words):
        assert torch.equal(ours, theirs)
    assert torch.equal(philox.rand(seed, offsets), uniform)
    # rtol: on a GPU tl.randn takes an approximate sqrt (a few ulp, ~5e-7 at |z| ~ 5.7 in the tails)
    assert torch.allclose(philox.randn(seed, offsets), normal, rtol=1e-6, atol=1e-6)


def test_tensor_seed_equals_int_seed():
    offsets = _offsets()
    seed = 2**35 + 11
    assert torch.equal(philox.randn(torch.tensor(seed), offsets), philox.randn(seed, offsets))
    assert torch.equal(philox.rand(torch.tensor(seed), offsets), philox.rand(seed, offsets))


def test_distribution_is_sane():
    offsets = torch.arange(200_000)
    u = philox.rand(3, offsets)
    z = philox.randn(3, offsets)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5e-3
    assert abs(float(z.mean())) < 1e-2 and abs(float(z.std()) - 1.0) < 1e-2
    # Different seeds give different (uncorrelated) streams.
    assert abs(float(torch.corrcoef(torch.stack([z, philox.randn(4, offsets)]))[0, 1])) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    offsets = _offsets()
    for seed in (0, 2**40 + 7):
        for fn in (philox.randint, philox.rand):
            assert torch.equal(fn(seed, offsets.cuda()).cpu(), fn(seed, offsets))
        assert torch.allclose(philox.randn(seed, offsets.cuda()).cpu(), philox.randn(seed, offsets), rtol=1e-6,
                              atol=1e-6)
