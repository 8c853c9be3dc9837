"""The reference SFR objective against hand-written formulas (docs/design.md, "The method" and "Contracts")."""
import pytest
import torch

from sfr import FlowHead
from sfr_kernels import draw_source, draw_time, flow_path, philox, sfr_loss

D, E, HD = 24, 10, 16


def make_head(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    head = FlowHead(D, E, width=HD, depth=2, time_features=8).to(dtype)
    with torch.no_grad():  # the output layer is zero-initialised: give it weights so v != 0
        head.out.weight.normal_(0, 0.3)
        head.out.bias.normal_(0, 0.1)
    return head


class RecordingHead(FlowHead):
    """A FlowHead that remembers the (x_s, s) it was called with."""

    def forward(self, x_s, s, h):
        self.seen = (x_s.detach().clone(), s.detach().clone())
        self.v = super().forward(x_s, s, h)
        return self.v


def recording_head():
    head = RecordingHead(D, E, width=HD, depth=2, time_features=8)
    head.load_state_dict(make_head().state_dict())
    return head


def test_source_and_time_follow_the_rng_layout():
    n, m, seed, std = 5, 3, 99, 0.7
    x0 = draw_source(seed, n, m, E, std, "cpu")
    s_uniform = draw_time(seed, n, m, "uniform", "cpu")
    s_logit = draw_time(seed, n, m, "logit_normal", "cpu", time_mean=0.3, time_std=1.5)
    for a, mm, j in [(0, 0, 0), (2, 1, 7), (4, 2, 9)]:
        offset = torch.tensor([(a * m + mm) * E + j])
        assert x0[a, mm, j] == std * philox.randn(seed, offset)[0]
        row = torch.tensor([a * m + mm])
        assert s_uniform[a, mm] == philox.rand(seed + 1, row)[0]
        assert s_logit[a, mm] == torch.sigmoid(0.3 + 1.5 * philox.randn(seed + 1, row))[0]
    assert torch.equal(draw_time(seed, n, m, "zero", "cpu"), torch.zeros(n, m))


def test_flow_path_formula():
    x0, y, s = torch.randn(4, 3, E), torch.randn(4, E), torch.rand(4, 3)
    x_s, u = flow_path(x0, y, s)
    for a in range(4):
        for m in range(3):
            assert torch.allclose(x_s[a, m], (1 - s[a, m]) * x0[a, m] + s[a, m] * y[a], atol=1e-7)
            assert torch.equal(u[a, m], y[a] - x0[a, m])


def test_loss_equals_hand_formula_with_explicit_noise_and_time():
    n, m = 6, 4
    head = recording_head()
    h, y = torch.randn(n, D), torch.randn(n, E)
    x0, s = torch.randn(n, m, E), torch.rand(n, m)
    loss = sfr_loss(h, y, head, num_samples=m, noise=x0, time=s)
    seen_x, seen_s = head.seen
    expected_x = (1 - s[..., None]) * x0 + s[..., None] * y[:, None]
    assert torch.allclose(seen_x, expected_x, atol=1e-6)
    assert torch.equal(seen_s, s)
    u = y[:, None] - x0
    per_anchor = ((head.v.detach() - u) ** 2).sum(dim=(1, 2)) / (m * E)
    assert torch.allclose(loss, per_anchor.mean(), rtol=1e-6)


def test_seeded_draws_are_what_the_head_sees():
    n, m, seed = 5, 2, 1234
    head = recording_head()
    h, y = torch.randn(n, D), torch.randn(n, E)
    sfr_loss(h, y, head, num_samples=m, seed=seed, source_std=0.5, time_sampling="uniform")
    x0 = draw_source(seed, n, m, E, 0.5, "cpu")
    s = draw_time(seed, n, m, "uniform", "cpu")
    assert torch.allclose(head.seen[0], (1 - s[..., None]) * x0 + s[..., None] * y[:, None], atol=1e-6)
    assert torch.equal(head.seen[1], s)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weights_and_reductions(reduction):
    n, m = 7, 2
    head = make_head()
    h, y = torch.randn(n, D), torch.randn(n, E)
    w = torch.rand(n) + 0.1
    x0, s = torch.randn(n, m, E), torch.rand(n, m)
    per_anchor = torch.stack([
        sfr_loss(h[a:a + 1], y[a:a + 1], head, num_samples=m, noise=x0[a:a + 1], time=s[a:a + 1]) for a in range(n)
    ])
    loss = sfr_loss(h, y, head, num_samples=m, noise=x0, time=s, weight=w, reduction=reduction)
    expected = (w * per_anchor).sum() / (w.sum() if reduction == "mean" else 1.0)
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_all_zero_weights_give_zero_mean():
    head = make_head()
    loss = sfr_loss(torch.randn(3, D), torch.randn(3, E), head, weight=torch.zeros(3))
    assert loss.item() == 0.0


def test_anchor_index_gathers_and_scatters():
    head = make_head()
    hidden = torch.randn(2, 5, D, requires_grad=True)
    idx = torch.tensor([1, 4, 5, 9, 4])  # a duplicate: its gradients must add up
    y = torch.randn(5, E)
    loss = sfr_loss(hidden, y, head, anchor_index=idx, num_samples=2, seed=3)
    loss.backward()
    gathered = hidden.detach().reshape(-1, D)[idx].clone().requires_grad_(True)
    loss_gathered = sfr_loss(gathered, y, head, num_samples=2, seed=3)
    assert torch.allclose(loss, loss_gathered)
    (g,) = torch.autograd.grad(loss_gathered, gathered)
    expected = torch.zeros(10, D).index_add_(0, idx, g).view(2, 5, D)
    assert torch.allclose(hidden.grad, expected, atol=1e-7)
    untouched = [0, 2, 3, 6, 7, 8]
    assert hidden.grad.reshape(10, D)[untouched].abs().max() == 0


class FunctionalHead(torch.nn.Module):
    """Calls ``head`` with explicitly given parameter tensors, so gradcheck can perturb them."""

    hidden_size, embed_dim = D, E

    def __init__(self, head, params):
        super().__init__()
        self.head, self.params = head, params

    def forward(self, x_s, s, h):
        return torch.func.functional_call(self.head, self.params, (x_s, s, h))


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_gradcheck_float64(time_sampling):
    head = make_head(torch.float64)
    names = [name for name, _ in head.named_parameters()]
    hidden = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in head.parameters()]
    idx = torch.tensor([0, 2, 5, 2])
    y = torch.randn(4, E, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64)

    def loss_fn(hidden, *weights):
        bound = FunctionalHead(head, dict(zip(names, weights)))
        return sfr_loss(hidden, y, bound, anchor_index=idx, num_samples=2, seed=5, weight=w,
                        time_sampling=time_sampling, source_std=0.8)

    assert torch.autograd.gradcheck(loss_fn, (hidden, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad_scale", [0.0, 0.25, 1.0, 3.0])
def test_grad_scale_routes_only_the_backbone_gradient(grad_scale):
    head = make_head()
    h = torch.randn(4, D, requires_grad=True)
    y = torch.randn(4, E)
    ref_loss = sfr_loss(h, y, head, num_samples=2, seed=8)
    ref_h_grad, *ref_head_grads = torch.autograd.grad(ref_loss, [h, *head.parameters()])

    h2 = h.detach().clone().requires_grad_(True)
    loss = sfr_loss(h2, y, head, num_samples=2, seed=8, grad_scale=grad_scale)
    assert torch.equal(loss, ref_loss)  # the forward value does not depend on the routing
    head.zero_grad()
    loss.backward()
    for p, g in zip(head.parameters(), ref_head_grads):
        assert torch.allclose(p.grad, g)
    if grad_scale == 0:
        assert h2.grad is None  # detached: no gradient work at all for the backbone
    else:
        assert torch.allclose(h2.grad, grad_scale * ref_h_grad, rtol=1e-6, atol=1e-8)


def test_mtp_identity():
    head = make_head()
    h, y = torch.randn(9, D), torch.randn(9, E)
    loss = sfr_loss(h, y, head, source_std=0.0, time_sampling="zero", num_samples=1, seed=4)
    v = head(torch.zeros(9, E), torch.zeros(9), h)
    assert torch.allclose(loss, ((v - y) ** 2).mean(), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_anchor_set(reduction):
    head = make_head()
    hidden = torch.randn(2, 3, D, requires_grad=True)
    loss = sfr_loss(hidden, torch.randn(0, E), head, anchor_index=torch.zeros(0, dtype=torch.long),
                    num_samples=3, reduction=reduction)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().max() == 0
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in head.parameters())


def test_determinism_and_seed_sensitivity():
    head = make_head()
    h, y = torch.randn(8, D), torch.randn(8, E)
    a = sfr_loss(h, y, head, num_samples=3, seed=11)
    b = sfr_loss(h, y, head, num_samples=3, seed=11)
    c = sfr_loss(h, y, head, num_samples=3, seed=12)
    t = sfr_loss(h, y, head, num_samples=3, seed=torch.tensor(11))
    assert torch.equal(a, b) and torch.equal(a, t)
    assert not torch.equal(a, c)


def test_dtypes():
    head = make_head()
    h, y = torch.randn(5, D), torch.randn(5, E)
    ref = sfr_loss(h, y, head, seed=1)
    mixed = sfr_loss(h.bfloat16(), y.bfloat16(), head, seed=1)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, ref, rtol=2e-2)
    bf16_head = make_head(torch.bfloat16)
    low = sfr_loss(h.bfloat16(), y, bf16_head, seed=1)
    assert low.dtype == torch.float32 and torch.allclose(low, ref, rtol=5e-2)
    head64 = make_head(torch.float64)
    assert sfr_loss(h.double(), y.double(), head64, seed=1).dtype == torch.float64
