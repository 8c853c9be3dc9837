"""Hyper-parameters of the flow head and the SFR objective: one dataclass, shared by the trainer,
the CLI and the diagnostics."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from sfr.checks import check_int
from sfr_kernels.reference import TIME_SAMPLINGS

# Multi-Token Prediction as the degenerate case of SFR (docs/design.md, "MTP as a degenerate case"): x0 = 0 and s = 0, so
# x_s = 0 and u = y: the head regresses the future embedding from h. One sample suffices (no draws).
MTP_PRESET = dict(source_std=0.0, time_sampling="zero", num_samples=1)


@dataclass
class SFRConfig:
    """Head architecture and objective. ``SFRConfig.mtp()`` is the Multi-Token-Prediction preset.

    Attributes:
        head_width: ``Hd``, the head's hidden width.
        head_depth: number of SiLU layers (``depth - 1`` hidden ``Hd x Hd`` layers after the input).
        time_features: ``F``, sinusoidal timestep features (even).
        num_samples: ``M``, source/time draws per anchor.
        source_std: ``sigma`` of the Gaussian source ``x0 ~ N(0, sigma^2 I)``; 0 = deterministic.
        time_sampling: ``"uniform"`` on [0, 1], ``"logit_normal"`` or ``"zero"`` (s = 0).
        time_mean, time_std: location and scale of the logit-normal time distribution.
        reduction: ``"mean"`` over anchors, or ``"sum"`` (the trainer normalises by the anchor count
            of the whole accumulated batch).
        target_scale: the targets ``y`` are multiplied by this before the loss (:meth:`target_multiplier`):
            a number > 0, or ``"sqrt_e"`` for ``sqrt(E)``, which gives unit-norm encoder targets unit
            per-dimension variance, like the ``sigma = 1`` source. With 1.0 (the default) the part of the
            flow target ``u = y - x0`` that depends on the future is ~1/E of the noise's, and the MTP
            loss is O(1/E); docs/study.md measures what the scale changes.
    """

    head_width: int = 1024
    head_depth: int = 2
    time_features: int = 64
    num_samples: int = 1
    source_std: float = 1.0
    time_sampling: str = "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    reduction: str = "mean"
    target_scale: float | str = 1.0

    def __post_init__(self):
        for name in ("head_width", "head_depth", "num_samples"):
            check_int(name, getattr(self, name))
        if not isinstance(self.time_features, int) or self.time_features < 2 or self.time_features % 2:
            raise ValueError(f"time_features must be an even int >= 2, got {self.time_features!r}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {self.time_sampling!r}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        for name in ("source_std", "time_std"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.target_scale != "sqrt_e":
            try:
                scale = float(self.target_scale)  # also a number given as text (a CLI flag)
            except (TypeError, ValueError):
                scale = math.nan
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"target_scale must be a finite number > 0 or 'sqrt_e', got {self.target_scale!r}")
            self.target_scale = scale

    @classmethod
    def mtp(cls, **overrides) -> SFRConfig:
        """Multi-Token Prediction as the degenerate case: :data:`MTP_PRESET` (``overrides`` win)."""
        return cls(**{**MTP_PRESET, **overrides})

    def loss_kwargs(self) -> dict:
        """Keyword arguments of :func:`sfr_kernels.sfr_loss` set by this config."""
        return dict(num_samples=self.num_samples, source_std=self.source_std,
                    time_sampling=self.time_sampling, time_mean=self.time_mean,
                    time_std=self.time_std, reduction=self.reduction)

    def target_multiplier(self, embed_dim: int) -> float:
        """What the targets are multiplied by before the loss: ``target_scale``, or ``sqrt(embed_dim)``."""
        return math.sqrt(embed_dim) if self.target_scale == "sqrt_e" else float(self.target_scale)

    def head_kwargs(self) -> dict:
        """Keyword arguments of :class:`sfr.FlowHead` set by this config."""
        return dict(width=self.head_width, depth=self.head_depth, time_features=self.time_features)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_mtp_preset(self) -> SFRConfig:
        """This config (head architecture, reduction) with the sampling settings of :data:`MTP_PRESET`."""
        return replace(self, **MTP_PRESET)
