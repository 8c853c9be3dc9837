"""pytest-benchmark suite of the CPU-measurable pieces: the reference loss and the Philox port.

Skipped in normal test runs (``--benchmark-skip`` in pyproject's addopts); run with::

    python -m pytest bench --benchmark-only

Small shapes: these time the pure-PyTorch reference on whatever device runs them (the CPU in CI),
not the fused kernels (``python -m bench.loss`` on a GPU does that).
"""
import pytest
import torch

from sfr.head import FlowHead
from sfr_kernels import philox, sfr_loss

N, M, D, E, WIDTH = 512, 2, 256, 128, 256
PHILOX_OFFSETS = 1 << 20


@pytest.fixture
def loss_inputs():
    torch.manual_seed(0)
    head = FlowHead(D, E, width=WIDTH, depth=2, time_features=64)
    head.out.reset_parameters()  # the zero-initialised output layer would give trivial gradients
    hidden = torch.randn(N, D, requires_grad=True)
    target = torch.nn.functional.normalize(torch.randn(N, E), dim=-1)
    return head, hidden, target


def test_reference_forward(benchmark, loss_inputs):
    head, hidden, target = loss_inputs
    loss = benchmark(lambda: sfr_loss(hidden, target, head, num_samples=M, seed=3, backend="torch"))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0


def test_reference_forward_backward(benchmark, loss_inputs):
    head, hidden, target = loss_inputs

    def step():
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        loss = sfr_loss(hidden, target, head, num_samples=M, seed=3, backend="torch")
        loss.backward()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss)
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_philox_randn_1m(benchmark):
    offsets = torch.arange(PHILOX_OFFSETS, dtype=torch.int64)
    draws = benchmark(lambda: philox.randn(1234, offsets))
    assert draws.shape == (PHILOX_OFFSETS,)
    # A million standard normals: mean within ~5 standard errors of 0, variance near 1.
    assert abs(draws.mean().item()) < 5e-3 and abs(draws.var().item() - 1) < 1e-2
