"""The fused Triton SFR loss against the PyTorch reference (CPU: Triton interpreter, float32).

Tolerances (float32, interpreter vs reference; both accumulate in float32, in different orders):

    loss                 rtol 1e-5, atol 1e-6
    every gradient       rtol 1e-4, atol 1e-6   (gradients here are O(1e-3 .. 1e-1))
    bf16 d_hidden        rtol 2**-7, atol 2**-8 * max|ref|  (fp32 head, bf16 hidden: one bf16 rounding)

Observed (fp32, interpreter, SHAPES below): loss relative error <= 1.3e-7; gradients
max|err| / max|ref| <= 4e-7 for uniform/zero time, <= 2e-5 for logit_normal (the PyTorch randn port
differs from tl.randn by <= 1e-6, and the time features, up to 1000 rad per unit of s, amplify it).

Every run poisons the kernels' output buffers with NaN first (``SFR_KERNELS_DEBUG=1``), so an
element a kernel forgets to write shows up as a NaN mismatch.
"""
import copy
import os

import pytest
import torch

from sfr import FlowHead
from sfr_kernels import fused_loss, head_support, launch, sfr_loss
from sfr_kernels.testing import loss_and_grads

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)",
)

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    monkeypatch.setenv(launch.DEBUG_ENV, "1")


def make_head(d, e, width=32, depth=2, time_features=16, seed=0):
    """A FlowHead with random (non-zero) weights everywhere, the output layer included."""
    torch.manual_seed(seed)
    head = FlowHead(d, e, width=width, depth=depth, time_features=time_features)
    with torch.no_grad():
        head.out.weight.normal_(0, 0.1)
        head.out.bias.normal_(0, 0.1)
    return head


run = loss_and_grads  # loss and every gradient (hidden first, then the head parameters by name)


def assert_matches_reference(hidden, target, head, **kwargs):
    ref_loss, ref_grads = run("torch", hidden, target, head, **kwargs)
    loss, grads = run("triton", hidden, target, head, **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None, name
            continue
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], ref, **GRAD_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
    return loss, grads


# (N, M, D, E, width, time_features, depth): a realistic-but-small shape (E=384, the MiniLM
# default) and odd ones (N=1, N=37, non-power-of-two D/E/width/F, depth 1 and 3).
SHAPES = {
    "realistic": (16, 2, 64, 384, 64, 64, 2),
    "single_anchor": (1, 1, 8, 5, 16, 4, 2),
    "odd": (37, 3, 50, 40, 160, 10, 3),  # width 160: two width tiles, the second one partial
    "depth1": (9, 3, 33, 17, 20, 6, 1),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal", "zero"])
def test_matches_reference_on_shapes(shape, time_sampling):
    n, m, d, e, width, features, depth = SHAPES[shape]
    head = make_head(d, e, width, depth, features)
    hidden, target = torch.randn(n, d), torch.randn(n, e)
    assert_matches_reference(hidden, target, head, num_samples=m, seed=11, time_sampling=time_sampling,
                             source_std=0.8, time_mean=0.2, time_std=1.3)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("grad_scale", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_reductions_weights_and_grad_scale(reduction, grad_scale, weighted):
    n, m, d, e = 13, 3, 20, 24
    head = make_head(d, e, width=24, time_features=8)
    hidden, target = torch.randn(n, d), torch.randn(n, e)
    weight = torch.rand(n) * 2 if weighted else None
    loss, grads = assert_matches_reference(hidden, target, head, num_samples=m, seed=3, weight=weight,
                                           reduction=reduction, grad_scale=grad_scale, loss_scale=2.5)
    if grad_scale == 0:
        assert grads["hidden"] is None  # hidden is detached: no gradient work at all
    else:
        assert grads["hidden"].abs().sum() > 0


@pytest.mark.parametrize("as_3d", [False, True])
def test_anchor_index_with_duplicates(as_3d):
    b, t, d, e, m = 3, 7, 22, 12, 2
    head = make_head(d, e, width=16, time_features=8)
    hidden = torch.randn(b, t, d) if as_3d else torch.randn(b * t, d)
    anchor_index = torch.tensor([0, 5, 5, 20, 3, 5, 11, 0, 14])  # duplicates accumulate
    target = torch.randn(anchor_index.numel(), e)
    _, grads = assert_matches_reference(hidden, target, head, anchor_index=anchor_index, num_samples=m,
                                        seed=5, grad_scale=0.7)
    assert grads["hidden"].shape == hidden.shape
    flat = grads["hidden"].reshape(b * t, d)
    untouched = torch.ones(b * t, dtype=torch.bool)
    untouched[anchor_index] = False
    assert torch.equal(flat[untouched], torch.zeros_like(flat[untouched]))


def test_explicit_noise_and_time():
    n, m, d, e = 11, 3, 18, 26
    head = make_head(d, e, width=24, time_features=12)
    hidden, target = torch.randn(n, d), torch.randn(n, e)
    noise, time = torch.randn(n, m, e) * 0.9, torch.rand(n, m)
    assert_matches_reference(hidden, target, head, num_samples=m, noise=noise, time=time)
    # Only the noise, only the time: the other one is drawn from the seed.
    assert_matches_reference(hidden, target, head, num_samples=m, noise=noise, seed=8)
    assert_matches_reference(hidden, target, head, num_samples=m, time=time, seed=8, time_sampling="zero")


def test_tensor_seed_matches_int_seed_and_large_seeds():
    n, m, d, e = 6, 2, 12, 10
    head = make_head(d, e, width=16, time_features=8)
    hidden, target = torch.randn(n, d), torch.randn(n, e)
    for seed in (0, 2**31 - 1, 2**40 + 3):  # 2**31 - 1: seed + 1 must not wrap to int32
        loss_int, grads_int = assert_matches_reference(hidden, target, head, num_samples=m, seed=seed)
        loss_tensor, grads_tensor = run("triton", hidden, target, head, num_samples=m,
                                        seed=torch.tensor(seed, dtype=torch.int64))
        assert torch.equal(loss_int, loss_tensor)
        assert all(torch.equal(grads_int[k], grads_tensor[k]) for k in grads_int)
    other, _ = run("triton", hidden, target, head, num_samples=m, seed=1)
    assert not torch.equal(other, loss_int)  # the seed is actually used


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_anchor_offset_continues_the_draw_layout_of_a_larger_call(backend, time_sampling):
    """Two calls over the halves of a batch, the second with ``anchor_offset`` = the first's anchor count
    (an int or a device tensor, as data-parallel ranks pass it), draw what one call over the whole batch
    draws: summed losses and gradients equal the whole call's."""
    n, split, m, d, e = 13, 5, 3, 20, 24
    head = make_head(d, e, width=24, time_features=8)
    hidden, target = torch.randn(n, d), torch.randn(n, e)
    options = dict(num_samples=m, seed=9, time_sampling=time_sampling, reduction="sum", grad_scale=0.6)
    whole_loss, whole = run(backend, hidden, target, head, **options)
    first_loss, first = run(backend, hidden[:split], target[:split], head, **options)
    for offset in (split, torch.tensor(split)):
        second_loss, second = run(backend, hidden[split:], target[split:], head, anchor_offset=offset, **options)
        torch.testing.assert_close(first_loss + second_loss, whole_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.cat([first["hidden"], second["hidden"]]), whole["hidden"], **GRAD_TOL)
        for name, grad in whole.items():
            if name != "hidden":
                torch.testing.assert_close(first[name] + second[name], grad, **GRAD_TOL)
    unshifted_loss, _ = run(backend, hidden[split:], target[split:], head, **options)
    assert not torch.allclose(unshifted_loss, second_loss)  # without the offset the draws differ
    if backend == "triton" and time_sampling == "uniform":  # the kernels draw what the reference draws (uniform
        # time is bit-exact in the Philox port; the logit-normal time's randn is within 1e-6, amplified here)
        assert_matches_reference(hidden[split:], target[split:], head, anchor_offset=split, **options)


def test_bit_deterministic():
    n, m, d, e = 37, 3, 40, 30
    head = make_head(d, e, width=32, time_features=16)
    hidden, target = torch.randn(3 * n, d), torch.randn(n, e)
    anchor_index = torch.randint(0, 3 * n, (n,))
    kwargs = dict(num_samples=m, seed=21, anchor_index=anchor_index, weight=torch.rand(n), grad_scale=0.3)
    first_loss, first = run("triton", hidden, target, head, **kwargs)
    second_loss, second = run("triton", hidden, target, head, **kwargs)
    assert torch.equal(first_loss, second_loss)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_upstream_gradient_scales_everything():
    n, m, d, e = 5, 2, 12, 10
    head = make_head(d, e, width=16, time_features=8)
    hidden, target = torch.randn(n, d), torch.randn(n, e)
    _, unit = run("triton", hidden, target, head, num_samples=m, seed=4)
    _, scaled = run("triton", hidden, target, head, num_samples=m, seed=4, loss_scale=-3.0)
    for name in unit:
        torch.testing.assert_close(scaled[name], -3.0 * unit[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_anchors(reduction):
    d, e = 12, 10
    head = make_head(d, e, width=16, time_features=8)
    hidden = torch.randn(4, 3, d)
    anchor_index = torch.zeros(0, dtype=torch.int64)
    loss, grads = run("triton", hidden, torch.randn(0, e), head, anchor_index=anchor_index, num_samples=2,
                      reduction=reduction)
    assert loss.item() == 0.0
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name


def test_all_zero_weights_mean_is_zero_with_zero_grads():
    n, d, e = 4, 12, 10
    head = make_head(d, e, width=16, time_features=8)
    loss, grads = run("triton", torch.randn(n, d), torch.randn(n, e), head, weight=torch.zeros(n))
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


def test_mtp_degenerate_case():
    n, d, e = 7, 12, 10
    head = make_head(d, e, width=16, time_features=8)
    assert_matches_reference(torch.randn(n, d), torch.randn(n, e), head, source_std=0.0,
                             time_sampling="zero", num_samples=2)


def test_no_grad_computes_only_the_loss():
    n, m, d, e = 9, 2, 12, 10
    head = make_head(d, e, width=16, time_features=8)
    hidden, target = torch.randn(n, d), torch.randn(n, e)
    with_grad, _ = run("triton", hidden, target, head, num_samples=m, seed=6)
    with torch.no_grad():
        loss = sfr_loss(hidden, target, head, num_samples=m, seed=6, backend="triton")
    assert torch.equal(loss, with_grad) and not loss.requires_grad
    head.requires_grad_(False)  # frozen head and no hidden gradient: nothing to differentiate
    loss = sfr_loss(hidden.requires_grad_(True), target, head, num_samples=m, seed=6, grad_scale=0.0,
                    backend="triton")
    assert torch.equal(loss, with_grad) and not loss.requires_grad


def test_autocast_runs_a_float32_head_in_the_autocast_dtype_like_the_reference():
    """Under autocast the reference's Linear layers compute in the autocast dtype; so does the fused op
    (float16 here: the interpreter computes bfloat16 wrongly). The float32 parameters get float32
    gradients, as accurate as the autocast reference's."""
    n, m, d, e = 64, 2, 24, 20
    head = make_head(d, e, width=32, time_features=8)
    hidden, target = torch.randn(n, d), torch.nn.functional.normalize(torch.randn(n, e), dim=-1)
    exact_loss, exact = run("torch", hidden, target, head, num_samples=m, seed=6)
    plain_loss, _ = run("triton", hidden, target, head, num_samples=m, seed=6)
    with torch.autocast("cpu", dtype=torch.float16):
        ours_loss, ours = run("triton", hidden, target, head, num_samples=m, seed=6)
        theirs_loss, theirs = run("torch", hidden, target, head, num_samples=m, seed=6)
    assert not torch.equal(ours_loss, plain_loss)  # autocast took effect
    assert (ours_loss - exact_loss).abs() <= 2 * (theirs_loss - exact_loss).abs() + 1e-3 * exact_loss.abs()
    for name, ref in exact.items():
        assert ours[name].dtype == ref.dtype, name  # float32 gradients for float32 parameters
        ours_err, theirs_err = (ours[name] - ref).abs().max(), (theirs[name] - ref).abs().max()
        assert ours_err <= 2 * theirs_err + 1e-3 * ref.abs().max(), (name, float(ours_err), float(theirs_err))


@pytest.mark.parametrize("with_index", [False, True])
def test_bfloat16_hidden_with_float32_head(with_index):
    # The usual mixed setup (bf16 backbone, fp32 head): kernels run in fp32, d_hidden comes back in
    # bf16. Duplicated anchors are summed in fp32 and rounded once (the reference rounds per add),
    # hence a tolerance of one bf16 rounding step.
    n, m, d, e = 6, 2, 12, 10
    head = make_head(d, e, width=16, time_features=8)
    anchor_index = torch.tensor([0, 3, 3, 5, 1, 7]) if with_index else None
    hidden = torch.randn(8 if with_index else n, d, dtype=torch.bfloat16)
    target = torch.randn(n, e, dtype=torch.bfloat16)
    ref_loss, ref = run("torch", hidden, target, head, anchor_index=anchor_index, num_samples=m, seed=3,
                        grad_scale=0.5)
    loss, got = run("triton", hidden, target, head, anchor_index=anchor_index, num_samples=m, seed=3,
                    grad_scale=0.5)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    assert got["hidden"].dtype == torch.bfloat16
    torch.testing.assert_close(got["hidden"], ref["hidden"], rtol=2**-7, atol=2**-8 * float(ref["hidden"].abs().max()))
    for name in ref:
        if name != "hidden":
            torch.testing.assert_close(got[name], ref[name], **GRAD_TOL)


def test_frozen_head_parameters_get_no_gradient():
    n, d, e = 5, 12, 10
    head = make_head(d, e, width=16, time_features=8)
    head.cond.requires_grad_(False)
    _, grads = run("triton", torch.randn(n, d), torch.randn(n, e), head, seed=2)
    assert grads["cond.weight"] is None and grads["in_x.weight"] is not None
    assert grads["hidden"] is not None


# ---------------------------------------------------------------------------------------------
# Fallback and errors


class _ShiftedHead(FlowHead):
    def forward(self, x_s, s, h):
        return super().forward(x_s, s, h) + 1.0


class _OtherKindHead(FlowHead):
    kind = "transformer"


def _hooked_head(d, e):
    head = make_head(d, e, width=16, time_features=8)
    head.in_x.register_forward_hook(lambda module, args, output: output * 2)
    return head


@pytest.mark.parametrize("variant", ["custom_forward", "other_kind", "hook", "float64", "target_grad"])
def test_unsupported_heads_fall_back_with_one_warning(variant):
    n, d, e = 5, 12, 10
    if variant == "custom_forward":
        head = _ShiftedHead(d, e, width=16, time_features=8)
    elif variant == "other_kind":
        head = _OtherKindHead(d, e, width=16, time_features=8)
    elif variant == "hook":
        head = _hooked_head(d, e)
    else:
        head = make_head(d, e, width=16, time_features=8)
    dtype = torch.float64 if variant == "float64" else torch.float32
    head = head.to(dtype)
    hidden, target = torch.randn(n, d, dtype=dtype), torch.randn(n, e, dtype=dtype)
    if variant == "target_grad":
        target.requires_grad_(True)
    head_support._warned.clear()
    with pytest.warns(UserWarning, match="falling back to the PyTorch reference"):
        loss = sfr_loss(hidden, target, head, seed=1, backend="triton")
    with _no_warnings():  # once only
        again = sfr_loss(hidden, target, head, seed=1, backend="triton")
    reference = sfr_loss(hidden, target, head, seed=1, backend="torch")
    assert torch.equal(loss, reference) and torch.equal(again, reference)


def _no_warnings():
    import warnings

    class _Catch:
        def __enter__(self):
            self._ctx = warnings.catch_warnings(record=True)
            self.records = self._ctx.__enter__()
            warnings.simplefilter("always")
            return self

        def __exit__(self, *exc):
            self._ctx.__exit__(*exc)
            assert not [w for w in self.records if "falling back" in str(w.message)]

    return _Catch()


def test_supported_head_has_no_fallback_reason():
    assert head_support.unsupported_head_reason(make_head(12, 10, width=16, time_features=8)) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_heads_take_the_fused_path(dtype):
    # head.to(dtype) also casts the time_frequencies buffer; the kernels must not fall back for it.
    assert head_support.unsupported_head_reason(make_head(12, 10, width=16, time_features=8).to(dtype)) is None


def test_rounded_time_frequencies_are_read_as_the_reference_reads_them():
    # bf16 arithmetic is not testable in the interpreter, but a bf16 frequency buffer with a float32
    # head is: the kernels must upcast the stored values, exactly as torch promotes them.
    n, m, d, e = 7, 2, 12, 10
    head = make_head(d, e, width=16, time_features=16)
    head.time_frequencies = head.time_frequencies.to(torch.bfloat16)
    assert head_support.unsupported_head_reason(head) is None
    assert_matches_reference(torch.randn(n, d), torch.randn(n, e), head, num_samples=m, seed=12)


def test_triton_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    head = make_head(12, 10, width=16, time_features=8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sfr_loss(torch.randn(3, 12), torch.randn(3, 10), head, backend="triton")


# ---------------------------------------------------------------------------------------------
# torch.compile and torch.library


class _TinyModel(torch.nn.Module):
    def __init__(self, d, e):
        super().__init__()
        self.body = torch.nn.Linear(d, d)
        self.head = make_head(d, e, width=16, time_features=8)

    def forward(self, x, target, seed):
        return sfr_loss(torch.tanh(self.body(x)), target, self.head, num_samples=2, seed=seed,
                        backend="triton", grad_scale=0.5)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_matches_eager(compile_backend):
    torch._dynamo.reset()
    n, d, e = 6, 12, 10
    model = _TinyModel(d, e)
    x, target, seed = torch.randn(n, d), torch.randn(n, e), torch.tensor(9)

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(x, target, seed)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads(model)
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    compiled_loss, compiled_grads = loss_and_grads(compiled)
    assert torch.equal(compiled_loss, eager_loss)
    for ours, theirs in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)
    seed.add_(1)  # a new seed in the same tensor: a new loss, and no recompilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        new_loss, _ = loss_and_grads(compiled)
    assert not torch.equal(new_loss, eager_loss)
    torch.testing.assert_close(new_loss, loss_and_grads(model)[0], rtol=0, atol=0)


def _op_args(head, hidden, target, anchor_index=None, m=2, grad_scale=1.0):
    layers = list(head.hidden_layers)
    return (hidden, target, anchor_index, torch.tensor([3, 0]), None, None, None,
            head.cond.weight, head.cond.bias, head.in_x.weight, head.in_t.weight, head.time_frequencies,
            [w.weight for w in layers], [w.bias for w in layers], head.out.weight, head.out.bias,
            m, 1.0, "uniform", 0.0, 1.0, "mean", grad_scale, True, True)


def test_library_op_registration_is_consistent():
    """torch.library.opcheck: schema, fake (meta) kernel and autograd registration agree."""
    n, d, e = 4, 12, 10
    head = make_head(d, e, width=16, time_features=8)
    args = _op_args(head, torch.randn(n, d, requires_grad=True), torch.randn(n, e))
    torch.library.opcheck(fused_loss.fused_sfr_loss_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))
    # The backward op on its own (anchor_index with duplicates, so the scatter path is covered too).
    index = torch.tensor([0, 2, 2, 5])
    hidden = torch.randn(3, 2, d)
    with torch.no_grad():
        _, *saved = fused_loss.fused_sfr_loss_op(*_op_args(head, hidden, args[1], index, grad_scale=0.5))
    backward_args = (torch.tensor(1.5), hidden, index, head.cond.weight, saved, e, 0.5, True, True)
    torch.library.opcheck(fused_loss.fused_sfr_loss_backward_op, backward_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_tf32_is_read_under_torch_new_precision_api():
    """transformers' --tf32 sets torch.backends.fp32_precision (torch >= 2.9), after which reading the
    legacy matmul.allow_tf32 raises: the fused path must still run, and follow the setting."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the legacy TF32 flag")
    saved = torch.backends.fp32_precision, matmul.fp32_precision
    n, d, e = 8, 12, 10
    head = make_head(d, e, width=16, time_features=8)
    try:
        torch.backends.fp32_precision = "tf32"
        assert launch.dot_precision(torch.float32) == "tf32"
        assert launch.dot_precision(torch.bfloat16) == "tf32"
        loss = sfr_loss(torch.randn(n, d), torch.randn(n, e), head, num_samples=2, seed=1, backend="triton")
        assert torch.isfinite(loss)
        torch.backends.fp32_precision = "ieee"
        assert launch.dot_precision(torch.float32) == "ieee"
    finally:
        torch.backends.fp32_precision, matmul.fp32_precision = saved
    assert launch.dot_precision(torch.float32) == ("tf32" if matmul.allow_tf32 else "ieee")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fake_kernels_promise_the_real_shapes_dtypes_and_strides(dtype):
    """Inductor trusts the fake kernels' strides: with a transposed (non-contiguous) hidden the real ops
    return contiguous gradients, and so must the fakes. The forward's saved gradients are float32.
    (float16 runs in the interpreter; bfloat16 does not: docs/design.md, "Testing".)"""
    n, d, e = 6, 12, 10
    head = make_head(d, e, width=16, time_features=8).to(dtype)
    hidden = torch.randn(d, n).to(dtype).t()  # [n, d], strides (1, n)
    forward_args = _op_args(head, hidden, torch.randn(n, e))
    real = fused_loss.fused_sfr_loss_op(*forward_args)
    fake = fused_loss._fused_sfr_loss_fake(*forward_args)
    assert all(t.dtype == torch.float32 for t in real[1:])
    backward_args = (torch.tensor(1.0), hidden, None, head.cond.weight, real[1:], e, 1.0, True, True)
    real_backward = fused_loss.fused_sfr_loss_backward_op(*backward_args)
    fake_backward = fused_loss._fused_sfr_loss_backward_fake(*backward_args)
    assert len(real) == len(fake) and len(real_backward) == len(fake_backward)
    for got, promised in zip([*real, *real_backward], [*fake, *fake_backward]):
        assert (got.shape, got.dtype, got.stride()) == (promised.shape, promised.dtype, promised.stride())
    assert real_backward[0].shape == hidden.shape and real_backward[0].is_contiguous()


def test_float16_head_under_a_loss_scale_is_as_accurate_as_the_float16_reference():
    """dL/dv = 2 coef (v - u) with coef = 1 / (M E N) lies in float16's subnormal range for N = 2048
    anchors: the fused path forms it in the forward, before the loss scale is known, so a float16 head
    keeps it in float32; the scale (2**16, beyond float16's 65504) is applied in float32 too."""
    n, m, d, e = 2048, 2, 16, 32
    torch.manual_seed(0)
    head32 = make_head(d, e, width=32, time_features=8)
    hidden, target = torch.randn(n, d), torch.nn.functional.normalize(torch.randn(n, e), dim=-1)
    head16 = copy.deepcopy(head32).half()
    exact_head = copy.deepcopy(head16).float()  # the same rounded weights: only arithmetic error counts
    kwargs = dict(num_samples=m, seed=5, loss_scale=2.0 ** 16)
    _, exact = run("torch", hidden.half().float(), target, exact_head, **kwargs)
    _, ours = run("triton", hidden.half(), target, head16, **kwargs)
    _, theirs = run("torch", hidden.half(), target, copy.deepcopy(head16), **kwargs)
    for name, ref in exact.items():
        ours_err = (ours[name].float() - ref).abs().max()
        theirs_err = (theirs[name].float() - ref).abs().max()
        assert torch.isfinite(ours[name]).all(), name
        assert ours_err <= 2 * theirs_err + 1e-3 * ref.abs().max(), (name, float(ours_err), float(theirs_err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_tiles_compute_the_reference(monkeypatch, dtype):
    """The GPU's launch configuration (128-row tiles, split epilogues, split-row weight gradients), run on
    the CPU by the interpreter: the tiles a GPU runs compute the same numbers (float16 against the float16
    reference: the same test as on a GPU, in the precision the interpreter gets right)."""
    monkeypatch.setenv(launch.TILES_ENV, "gpu")
    n, m, d, e = 70, 2, 24, 136  # 140 rows: two row tiles, the second partial; E: a partial column tile
    head = make_head(d, e, width=48, time_features=16).to(dtype)
    hidden, target = torch.randn(n, d).to(dtype), torch.randn(n, e).to(dtype)
    if dtype == torch.float32:
        assert_matches_reference(hidden, target, head, num_samples=m, seed=4, grad_scale=0.5)
        return
    exact = copy.deepcopy(head).float()
    _, ref = run("torch", hidden.float(), target.float(), exact, num_samples=m, seed=4)
    _, ours = run("triton", hidden, target, head, num_samples=m, seed=4)
    _, theirs = run("torch", hidden, target, copy.deepcopy(head), num_samples=m, seed=4)
    for name, r in ref.items():
        ours_err, theirs_err = (ours[name].float() - r).abs().max(), (theirs[name].float() - r).abs().max()
        assert ours_err <= 2 * theirs_err + 1e-3 * r.abs().max(), (name, float(ours_err), float(theirs_err))
