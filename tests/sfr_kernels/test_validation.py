"""Every bad argument of sfr_loss raises TypeError/ValueError naming the argument."""
import pytest
import torch

from sfr import FlowHead
from sfr_kernels import sfr_loss

N, D, E, M = 4, 12, 6, 2


def good():
    return dict(
        hidden=torch.randn(N, D), target=torch.randn(N, E), head=FlowHead(D, E, width=8),
        anchor_index=None, num_samples=M, source_std=1.0, time_sampling="uniform", seed=0, noise=None,
        time=None, weight=None, grad_scale=1.0, reduction="mean", backend="torch",
    )


def with_index(**kw):
    args = good()
    args.update(hidden=torch.randn(2, 3, D), anchor_index=torch.tensor([0, 1, 4, 5]))
    args.update(kw)
    return args


def call(args):
    args = dict(args)
    return sfr_loss(args.pop("hidden"), args.pop("target"), args.pop("head"), **args)


class NotAHead(torch.nn.Module):
    pass


CASES = [
    # (id, overrides or factory, exception, words the message must contain)
    ("hidden-not-tensor", dict(hidden=[[0.0] * D] * N), TypeError, ["hidden", "torch.Tensor"]),
    ("hidden-int", dict(hidden=torch.ones(N, D, dtype=torch.long)), TypeError, ["hidden", "floating"]),
    ("hidden-3d-without-index", dict(hidden=torch.randn(2, 2, D)), ValueError, ["hidden", "anchor_index"]),
    ("hidden-wrong-D", dict(hidden=torch.randn(N, D + 1)), ValueError, ["hidden", "hidden_size"]),
    ("target-int", dict(target=torch.ones(N, E, dtype=torch.int32)), TypeError, ["target", "floating"]),
    ("target-wrong-E", dict(target=torch.randn(N, E + 1)), ValueError, ["target", "[N, E]"]),
    ("target-wrong-N", dict(target=torch.randn(N + 1, E)), ValueError, ["target", "[N, E]"]),
    ("target-1d", dict(target=torch.randn(E)), ValueError, ["target"]),
    ("head-not-module", dict(head=lambda x, t, h: x), TypeError, ["head", "FlowHead"]),
    ("head-no-attrs", dict(head=NotAHead()), TypeError, ["head", "hidden_size"]),
    ("index-int32", with_index(anchor_index=torch.tensor([0, 1, 4, 5], dtype=torch.int32)), TypeError,
     ["anchor_index", "int64"]),
    ("index-2d", with_index(anchor_index=torch.tensor([[0, 1], [4, 5]])), ValueError, ["anchor_index", "1-D"]),
    ("index-out-of-range", with_index(anchor_index=torch.tensor([0, 1, 4, 6])), ValueError,
     ["anchor_index", "[0, 6)"]),
    ("index-negative", with_index(anchor_index=torch.tensor([-1, 1, 4, 5])), ValueError, ["anchor_index"]),
    ("index-4d-hidden", with_index(hidden=torch.randn(1, 2, 3, D)), ValueError, ["hidden", "[B, T, D]"]),
    ("num-samples-zero", dict(num_samples=0), ValueError, ["num_samples", ">= 1"]),
    ("num-samples-float", dict(num_samples=2.0), TypeError, ["num_samples", "int"]),
    ("num-samples-bool", dict(num_samples=True), TypeError, ["num_samples"]),
    ("source-std-negative", dict(source_std=-0.1), ValueError, ["source_std"]),
    ("source-std-nan", dict(source_std=float("nan")), ValueError, ["source_std", "finite"]),
    ("source-std-str", dict(source_std="1"), TypeError, ["source_std"]),
    ("time-sampling", dict(time_sampling="beta"), ValueError, ["time_sampling", "uniform"]),
    ("reduction", dict(reduction="none"), ValueError, ["reduction", "mean"]),
    ("backend", dict(backend="cuda"), ValueError, ["backend", "triton"]),
    ("grad-scale-negative", dict(grad_scale=-1.0), ValueError, ["grad_scale"]),
    ("grad-scale-inf", dict(grad_scale=float("inf")), ValueError, ["grad_scale"]),
    ("seed-negative", dict(seed=-1), ValueError, ["seed"]),
    ("seed-too-large", dict(seed=2**63), ValueError, ["seed"]),
    ("seed-float", dict(seed=1.5), TypeError, ["seed"]),
    ("seed-tensor-1d", dict(seed=torch.tensor([1])), TypeError, ["seed", "0-dim"]),
    ("seed-tensor-float", dict(seed=torch.tensor(1.0)), TypeError, ["seed", "int64"]),
    ("anchor-offset-negative", dict(anchor_offset=-1), ValueError, ["anchor_offset"]),
    ("anchor-offset-float", dict(anchor_offset=2.0), TypeError, ["anchor_offset"]),
    ("anchor-offset-beyond-int64", dict(anchor_offset=2**62), ValueError, ["anchor_offset", "int64"]),
    ("anchor-offset-tensor-1d", dict(anchor_offset=torch.tensor([1])), TypeError, ["anchor_offset", "0-dim"]),
    ("noise-shape", dict(noise=torch.randn(N, M + 1, E)), ValueError, ["noise", "[N, M, E]"]),
    ("noise-int", dict(noise=torch.ones(N, M, E, dtype=torch.long)), TypeError, ["noise"]),
    ("time-shape", dict(time=torch.rand(N)), ValueError, ["time", "[N, M]"]),
    ("weight-shape", dict(weight=torch.rand(N, 1)), ValueError, ["weight", "[N]"]),
    ("weight-negative", dict(weight=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, ["weight", "non-negative"]),
    ("weight-int", dict(weight=torch.ones(N, dtype=torch.long)), TypeError, ["weight"]),
    ("time-mean-nan", dict(time_mean=float("nan")), ValueError, ["time_mean"]),
    ("time-std-negative", dict(time_std=-1.0), ValueError, ["time_std"]),
]


@pytest.mark.parametrize("overrides,error,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument(overrides, error, words):
    args = good()
    args.update(overrides)
    with pytest.raises(error) as info:
        call(args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_head_without_parameters():
    class Empty(torch.nn.Module):
        hidden_size, embed_dim = D, E

    with pytest.raises(ValueError, match="head has no parameters"):
        call(dict(good(), head=Empty()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch():
    with pytest.raises(ValueError, match="target must be on"):
        call(dict(good(), hidden=torch.randn(N, D, device="cuda"), head=FlowHead(D, E, width=8).cuda()))


def test_device_mismatch_meta():
    # The meta device stands in for an accelerator: metadata-only checks must catch the mismatch.
    with pytest.raises(ValueError, match="head parameters must be on meta"):
        call(dict(good(), hidden=torch.randn(N, D, device="meta"), target=torch.randn(N, E, device="meta")))
    meta_head = FlowHead(D, E, width=8).to("meta")
    with pytest.raises(ValueError, match="target must be on meta"):
        call(dict(good(), hidden=torch.randn(N, D, device="meta"), head=meta_head))


def test_triton_backend_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        call(dict(good(), backend="triton"))


def test_good_arguments_pass():
    assert torch.isfinite(call(good()))
    assert torch.isfinite(call(with_index()))


def test_compile_fullgraph_with_a_cpu_anchor_index():
    """The CPU-only range check of anchor_index reads values: skipped while compiling (no graph break)."""
    from sfr import FlowHead
    from sfr_kernels import sfr_loss

    torch._dynamo.reset()
    head = FlowHead(8, 6, width=16, depth=2, time_features=8)
    hidden, target, index = torch.randn(10, 8), torch.randn(4, 6), torch.tensor([0, 3, 3, 9])

    def loss(h, y, i):
        return sfr_loss(h, y, head, anchor_index=i, num_samples=2, seed=1, backend="torch")

    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(hidden, target, index), loss(hidden, target, index), rtol=1e-6, atol=1e-7)
