import pytest
import torch

from sfr import FlowHead, SFRConfig, sfr_loss


def test_defaults_and_mtp_preset():
    cfg = SFRConfig()
    assert (cfg.head_width, cfg.head_depth, cfg.num_samples, cfg.source_std, cfg.time_sampling) == (
        1024, 2, 1, 1.0, "uniform")
    mtp = SFRConfig.mtp()
    assert (mtp.source_std, mtp.time_sampling, mtp.num_samples) == (0.0, "zero", 1)
    assert SFRConfig.mtp(head_width=64).head_width == 64
    kept = SFRConfig(head_width=8, head_depth=3, num_samples=4, time_sampling="logit_normal").with_mtp_preset()
    assert (kept.head_width, kept.head_depth, kept.source_std, kept.time_sampling, kept.num_samples) == (
        8, 3, 0.0, "zero", 1)


def test_config_drives_head_and_loss():
    cfg = SFRConfig(head_width=16, num_samples=3, time_sampling="logit_normal", time_mean=-0.5)
    head = FlowHead(8, 5, **cfg.head_kwargs())
    assert head.width == 16
    loss = sfr_loss(torch.randn(4, 8), torch.randn(4, 5), head, seed=1, **cfg.loss_kwargs())
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert SFRConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs", [dict(head_width=0), dict(num_samples=0), dict(time_features=5),
                                    dict(time_sampling="beta"), dict(reduction="none"), dict(source_std=-1.0),
                                    dict(time_std=float("nan"))])
def test_bad_values(kwargs):
    with pytest.raises(ValueError):
        SFRConfig(**kwargs)


def test_target_scale_is_a_positive_number_or_sqrt_e():
    assert SFRConfig().target_scale == 1.0 and SFRConfig().target_multiplier(384) == 1.0
    assert SFRConfig(target_scale="2.5").target_scale == 2.5  # a number given as text (a CLI flag)
    assert SFRConfig(target_scale="sqrt_e").target_multiplier(384) == pytest.approx(384 ** 0.5)
    assert SFRConfig.mtp(target_scale="sqrt_e").target_scale == "sqrt_e"  # the preset keeps it
    for bad in (0, -1.0, float("inf"), "sqrt", None):
        with pytest.raises(ValueError, match="target_scale"):
            SFRConfig(target_scale=bad)
