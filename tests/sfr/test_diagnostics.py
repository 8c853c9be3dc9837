import pytest
import torch

from sfr import FlowHead, sfr_loss
from sfr.diagnostics import fork_scores, integrate_flow, pairwise_cosine_dispersion, render_html


def test_dispersion_matches_brute_force():
    x = torch.randn(3, 5, 7)
    unit = torch.nn.functional.normalize(x, dim=-1)
    for n in range(3):
        cos = unit[n] @ unit[n].T
        brute = 1 - (cos.sum() - cos.diag().sum()) / (5 * 4)
        assert torch.allclose(pairwise_cosine_dispersion(x)[n], brute, atol=1e-6)
    same = torch.randn(1, 1, 7).expand(1, 4, 7)
    assert pairwise_cosine_dispersion(same).abs().max() < 1e-6  # identical endpoints: locked
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_cosine_dispersion(torch.randn(2, 1, 7))


class ConstantVelocity(FlowHead):
    """v = y - x0 along the straight OT path, written as a function of (x, s): v = (y - x) / (1 - s)."""

    def __init__(self, y):
        super().__init__(4, y.shape[-1], width=4)
        self.y = y

    def velocity(self, x, s, c):
        return (self.y - x) / (1 - s[..., None]).clamp_min(1e-3)


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_integrate_flow_reaches_the_exact_endpoint(solver):
    y = torch.randn(2, 1, 6)
    head = ConstantVelocity(y)
    x0 = torch.randn(2, 3, 6)
    x1 = integrate_flow(head, torch.randn(2, 4), x0, steps=8, solver=solver)
    # The exact flow of this field is the straight line to y; Euler is exact on it too.
    assert torch.allclose(x1, y.expand_as(x1), atol=1e-4)
    with pytest.raises(ValueError, match="solver"):
        integrate_flow(head, torch.randn(2, 4), x0, solver="rk45")


def test_fork_scores_separate_locked_from_forked_futures():
    torch.manual_seed(0)
    D, E = 16, 8
    head = FlowHead(D, E, width=64)
    h = torch.randn(2, D)  # context 0: one future; context 1: two opposite futures
    y_lock = torch.nn.functional.normalize(torch.randn(E), dim=0)
    y_fork = torch.nn.functional.normalize(torch.randn(2, E), dim=-1)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for step in range(400):
        target = torch.stack([y_lock, y_fork[step % 2]])
        loss = sfr_loss(h, target, head, num_samples=8, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = fork_scores(head, h, num_draws=32, steps=16)
    assert scores.shape == (2,)
    assert scores[1] > scores[0] + 0.2, scores


def test_html_marks_response_tokens():
    page = render_html([{"index": 0, "tokens": ["<a>", "b", "c"], "positions": [0, 1], "fork_scores": [0.1, 0.4]}])
    assert "&lt;a&gt;" in page and 'title="fork 0.400"' in page and 'title="fork 0.100"' in page
