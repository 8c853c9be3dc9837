"""sfr.flow: solving the head's ODE from source draws."""
import pytest
import torch

from sfr.flow import sample_flow
from sfr.head import FlowHead


class ConstantVelocity(FlowHead):
    """v = y - x0 along the straight OT path, written as a function of (x, s): v = (y - x) / (1 - s)."""

    def __init__(self, y):
        super().__init__(4, y.shape[-1], width=4)
        self.y = y

    def velocity(self, x, s, c):
        return (self.y - x) / (1 - s[..., None]).clamp_min(1e-3)


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_sample_flow_reaches_the_exact_endpoint(method):
    y = torch.randn(2, 1, 6)
    head = ConstantVelocity(y)
    x0 = torch.randn(2, 3, 6)
    x1 = sample_flow(head, torch.randn(2, 4), x0, num_steps=8, method=method)
    # The exact flow of this field is the straight line to y; Euler is exact on it too.
    assert torch.allclose(x1, y.expand_as(x1), atol=1e-4)
    with pytest.raises(ValueError, match="method must be one of"):
        sample_flow(head, torch.randn(2, 4), x0, method="rk45")
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        sample_flow(head, torch.randn(2, 4), x0, num_steps=0)
