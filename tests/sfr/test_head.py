
import pytest
import torch

from sfr import FlowHead
from sfr_kernels import timestep_features, timestep_frequencies


def test_timestep_features_formula():
    freqs = timestep_frequencies(8)
    expected = torch.tensor([1000 * 10000 ** (-k / 4) for k in range(4)], dtype=torch.float32)
    assert torch.allclose(freqs, expected, rtol=1e-6)
    s = torch.rand(5)
    e = timestep_features(s, freqs)
    assert e.shape == (5, 8)
    assert torch.allclose(e[:, :4], torch.cos(s[:, None] * freqs))
    assert torch.allclose(e[:, 4:], torch.sin(s[:, None] * freqs))
    with pytest.raises(ValueError, match="even"):
        timestep_frequencies(7)


def test_forward_matches_the_documented_mlp():
    head = FlowHead(16, 6, width=12, depth=3, time_features=8)
    with torch.no_grad():
        head.out.weight.normal_()
    x, t, h = torch.randn(4, 6), torch.rand(4), torch.randn(4, 16)
    e = timestep_features(t, head.time_frequencies)
    a = torch.nn.functional.silu(x @ head.in_x.weight.T + e @ head.in_t.weight.T + h @ head.cond.weight.T + head.cond.bias)
    for layer in head.hidden_layers:
        a = torch.nn.functional.silu(a @ layer.weight.T + layer.bias)
    v = a @ head.out.weight.T + head.out.bias
    assert torch.allclose(head(x, t, h), v, atol=1e-6)
    assert len(head.hidden_layers) == 2


def test_conditioning_is_shared_across_samples():
    head = FlowHead(16, 6, width=12)
    with torch.no_grad():
        head.out.weight.normal_()
    x, t, h = torch.randn(3, 5, 6), torch.rand(3, 5), torch.randn(3, 16)
    v = head(x, t, h)
    assert v.shape == (3, 5, 6)
    v_expanded = head(x, t, h[:, None].expand(3, 5, 16))
    assert torch.allclose(v, v_expanded, atol=1e-6)
    # A scalar time broadcasts too.
    assert torch.allclose(head(x, 0.5, h), head(x, torch.full((3, 5), 0.5), h), atol=1e-6)


def test_output_layer_is_zero_initialised():
    head = FlowHead(16, 6, width=12)
    assert head.out.weight.abs().max() == 0 and head.out.bias.abs().max() == 0
    assert head(torch.randn(2, 6), torch.rand(2), torch.randn(2, 16)).abs().max() == 0
    # ... but the input and hidden layers are not, so gradients reach every parameter after one step.
    assert head.cond.weight.abs().max() > 0 and head.in_x.weight.abs().max() > 0


def test_parameter_count_and_state_dict():
    head = FlowHead(896, 384, width=1024, depth=2, time_features=64)
    d, e, w, f = 896, 384, 1024, 64
    expected = (d * w + w) + e * w + f * w + (w * w + w) + (w * e + e)
    assert sum(p.numel() for p in head.parameters()) == expected
    assert "time_frequencies" not in head.state_dict()  # derived from time_features, not saved
    assert expected == 2_820_480  # 2.8 M parameters at the Qwen2.5-0.5B + MiniLM shape


@pytest.mark.parametrize("kwargs", [dict(hidden_size=0, embed_dim=4), dict(hidden_size=4, embed_dim=4, width=0),
                                    dict(hidden_size=4, embed_dim=4, depth=0),
                                    dict(hidden_size=4, embed_dim=4, time_features=3),
                                    dict(hidden_size=4.0, embed_dim=4)])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        FlowHead(**kwargs)


def test_bad_forward_shapes():
    head = FlowHead(16, 6, width=12)
    with pytest.raises(ValueError, match="x_s"):
        head(torch.randn(2, 5), torch.rand(2), torch.randn(2, 16))
    with pytest.raises(ValueError, match="h must"):
        head(torch.randn(2, 6), torch.rand(2), torch.randn(2, 15))
