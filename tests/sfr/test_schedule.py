"""The lambda schedule and per-micro-batch seeds are pure functions of the step."""
import pytest
import torch

from sfr.schedule import device_seed, sfr_lambda, step_seed


def test_lambda_phases_and_ramp():
    lam = [sfr_lambda(step, phase_a_steps=3, ramp_steps=4, lambda_max=2.0) for step in range(10)]
    assert lam[:3] == [0.0, 0.0, 0.0]  # phase A
    assert lam[3:7] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # linear ramp, reaching lambda_max on its last step
    assert lam[7:] == [2.0, 2.0, 2.0]


def test_lambda_without_ramp_or_phase_a():
    assert sfr_lambda(0, 0, 0, 0.7) == 0.7
    assert sfr_lambda(4, 5, 0, 0.7) == 0.0
    assert sfr_lambda(5, 5, 0, 0.7) == 0.7


@pytest.mark.parametrize("kwargs", [dict(step=-1), dict(phase_a_steps=-2), dict(ramp_steps=1.5), dict(lambda_max=-1.0)])
def test_lambda_rejects_bad_input(kwargs):
    args = dict(step=0, phase_a_steps=1, ramp_steps=1, lambda_max=1.0) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        sfr_lambda(**args)


def test_step_seed_is_deterministic_distinct_and_in_range():
    seeds = {(s, k, m, r): step_seed(s, k, m, r) for s in (0, 1) for k in range(20) for m in range(3) for r in range(2)}
    assert len(set(seeds.values())) == len(seeds)  # no collisions between any two micro-batches
    assert all(0 <= v < 2**62 for v in seeds.values())
    assert step_seed(1, 7, 2, 1) == seeds[(1, 7, 2, 1)]
    # seed + 1 is the time stream: consecutive steps must not reuse one another's streams
    values = set(seeds.values())
    assert not any(v + 1 in values for v in values)


def test_device_seed_is_a_0dim_int64_tensor():
    seed = device_seed(3, 10, 1, 0, device="cpu")
    assert seed.dim() == 0 and seed.dtype == torch.int64
    assert int(seed) == step_seed(3, 10, 1, 0)
    with pytest.raises(ValueError, match="micro_step"):
        step_seed(0, 0, -1, 0)
