"""``SFRTrainingArguments``: the Trainer's arguments plus SFR's, and the embedded default's settings.

Every field is a flag of ``sfr train`` (:mod:`sfr.commands.train`) and a key of its ``--config`` file.
:data:`TINY_DEFAULTS` are the settings of the embedded tiny LM (``sfr train`` without ``--model``);
:func:`tiny_defaults` scales the :data:`SCALED_WITH_MAX_STEPS` settings with the run's ``max_steps``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from sfr.config import SFRConfig
from sfr.model import CE_BACKENDS, LOSS_BACKENDS, OBJECTIVES, TARGET_SOURCES, default_head_width
from sfr.schedule import sfr_lambda
from sfr.targets import SEGMENT_MODES
from sfr_kernels.reference import TIME_SAMPLINGS

# Settings that suit the embedded default (a tiny LM on the persona corpus: ~20 s on a 2-core CPU).
# `sfr train` applies them when no --model is given, for every setting the user leaves unset.
TINY_DEFAULTS = dict(
    max_steps=200,
    learning_rate=1e-3,
    lr_scheduler_type="cosine",
    warmup_steps=10,
    per_device_train_batch_size=8,
    logging_steps=10,
    save_steps=100,
    save_total_limit=2,
    phase_a_steps=40,
    ramp_steps=60,
    num_samples=4,  # 4 source/time draws per anchor: the corpus has only ~2 anchors per example
    dataloader_pin_memory=False,  # nothing to pin for on the CPU
)
SCALED_WITH_MAX_STEPS = ("warmup_steps", "phase_a_steps", "ramp_steps")


def tiny_defaults(max_steps: int | None = None) -> dict:
    """:data:`TINY_DEFAULTS` for a run of ``max_steps`` optimizer steps.

    Warm-up and the SFR phase lengths keep their proportions of the 200-step default (warm-up 5 %,
    phase A 20 %, ramp 30 %, rounded), so a short run still reaches lambda_max instead of ending inside
    phase A. ``None`` or ``max_steps <= 0`` (a run by epochs) keeps the defaults as they are.
    """
    values = dict(TINY_DEFAULTS)
    if max_steps is not None and max_steps > 0 and max_steps != TINY_DEFAULTS["max_steps"]:
        scale = max_steps / TINY_DEFAULTS["max_steps"]
        values.update({name: round(TINY_DEFAULTS[name] * scale) for name in SCALED_WITH_MAX_STEPS})
        values["max_steps"] = max_steps
    return values


@dataclass
class SFRArguments:
    """What SFR adds to a trainer's arguments: the objective, the lambda schedule, the head, the targets.

    A mixin of dataclass fields: :class:`SFRTrainingArguments` (``TrainingArguments``, ``sfr train``) and
    :class:`sfr.integrations.trl.SFRSFTConfig` (TRL's ``SFTConfig``) both carry these. The head/objective
    fields are those of :class:`sfr.SFRConfig` (``head_width`` None picks
    :func:`sfr.model.default_head_width`, ``min(1024, max(2 D, E))``). The class that mixes them in calls
    :meth:`check_sfr_arguments` in its ``__post_init__``.
    """

    objective: str = field(default="sfr", metadata={"choices": OBJECTIVES, "help": (
        "sfr (CE + flow-matching SFR), sft (plain CE, no head) or mtp (the deterministic Multi-Token-Prediction "
        "preset of the same head: source_std=0, time_sampling=zero, num_samples=1)")})
    target_source: str = field(default="precomputed", metadata={"choices": TARGET_SOURCES, "help": (
        "precomputed (frozen sentence-encoder embeddings from `sfr prepare`) or ema (online targets from an EMA "
        "teacher copy of the backbone through a fixed random projection)")})
    phase_a_steps: int = field(default=100, metadata={"help": (
        "phase A: optimizer steps with lambda = 0 (the head learns on detached features; backbone sees pure CE)")})
    ramp_steps: int = field(default=100, metadata={"help": "phase B: steps of the linear ramp of lambda from 0 to lambda_max"})
    lambda_max: float = field(default=1.0, metadata={"help": "final weight of the SFR gradient into the backbone"})
    ema_decay: float = field(default=0.999, metadata={"help": "decay of the EMA teacher (target_source=ema)"})
    projection_seed: int = field(default=0, metadata={"help": "seed of the EMA teacher's fixed D->E projection"})
    head_width: int | None = field(default=None, metadata={"help": (
        "flow head width Hd; unset = min(1024, max(2 * hidden_size, embed_dim)), a multiple of 64")})
    head_depth: int = field(default=2, metadata={"help": "flow head depth (number of SiLU layers)"})
    time_features: int = field(default=64, metadata={"help": "sinusoidal timestep features F (even)"})
    num_samples: int = field(default=1, metadata={"help": "M: source/time draws per anchor"})
    source_std: float = field(default=1.0, metadata={"help": "sigma of the Gaussian source (0 = deterministic)"})
    time_sampling: str = field(default="uniform", metadata={"choices": TIME_SAMPLINGS, "help": "uniform | logit_normal | zero"})
    time_mean: float = field(default=0.0, metadata={"help": "logit-normal time location"})
    time_std: float = field(default=1.0, metadata={"help": "logit-normal time scale"})
    target_scale: str = field(default="1.0", metadata={"help": (
        "multiply the targets by this before the SFR loss: a number > 0, or sqrt_e for sqrt(E) (unit per-dimension "
        "variance for unit-norm encoder targets; see docs/study.md)")})
    encoder: str | None = field(default=None, metadata={"help": (
        "sentence encoder for the targets when raw data is prepared (default: the one `sfr prepare` uses)")})
    segment_tokens: int = field(default=32, metadata={"help": "K: tokens of an anchor's future segment (preparing raw data)"})
    anchor_stride: int = field(default=8, metadata={"help": "S: an anchor every S response tokens (preparing raw data)"})
    min_segment_tokens: int = field(default=4, metadata={"help": "m: shorter segments are dropped (preparing raw data)"})
    segment_mode: str = field(default="window", metadata={"choices": SEGMENT_MODES, "help": (
        "window (K tokens) or sentence (up to the sentence end, at most K tokens) (preparing raw data)")})
    ce_backend: str = field(default="auto", metadata={"choices": CE_BACKENDS, "help": (
        "auto (Liger fused linear CE on CUDA when installed, else lm_head + CE), liger or torch")})
    loss_backend: str = field(default="auto", metadata={"choices": LOSS_BACKENDS, "help": (
        "sfr_loss backend: auto (Triton on CUDA, PyTorch reference elsewhere), triton or torch")})

    def check_sfr_arguments(self) -> None:
        """``ValueError`` naming the first SFR setting that is out of range (called by ``__post_init__``)."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.target_source not in TARGET_SOURCES:
            raise ValueError(f"target_source must be one of {TARGET_SOURCES}, got {self.target_source!r}")
        if self.target_source == "ema" and self.objective == "sft":
            raise ValueError("target_source='ema' needs a head: use objective 'sfr' or 'mtp'")
        for name in ("phase_a_steps", "ramp_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lambda_max < 0:
            raise ValueError(f"lambda_max must be >= 0, got {self.lambda_max}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.ce_backend not in CE_BACKENDS:
            raise ValueError(f"ce_backend must be one of {CE_BACKENDS}, got {self.ce_backend!r}")
        if self.loss_backend not in LOSS_BACKENDS:
            raise ValueError(f"loss_backend must be one of {LOSS_BACKENDS}, got {self.loss_backend!r}")
        self.sfr_config(hidden_size=64)  # validates the head/objective fields now, not at step 1
        if self.ddp_find_unused_parameters is None:
            # Every parameter gets a gradient at every step (the head runs even at lambda = 0), so DDP
            # needs no search for unused ones (which costs a graph traversal and breaks reentrant
            # gradient checkpointing). Pass --ddp-find-unused-parameters true for a backbone that has some.
            self.ddp_find_unused_parameters = False

    def sfr_config(self, hidden_size: int, embed_dim: int | None = None) -> SFRConfig:
        """The :class:`SFRConfig` of these arguments for a backbone of hidden size ``D`` and targets of dim ``E``."""
        width = self.head_width if self.head_width is not None else default_head_width(hidden_size, embed_dim)
        return SFRConfig(head_width=width, head_depth=self.head_depth, time_features=self.time_features,
                         num_samples=self.num_samples, source_std=self.source_std,
                         time_sampling=self.time_sampling, time_mean=self.time_mean, time_std=self.time_std,
                         reduction="sum", target_scale=self.target_scale)

    def lambda_at(self, step: int) -> float:
        """``lambda`` at optimizer step ``step`` (0-based): :func:`sfr.schedule.sfr_lambda` of these arguments."""
        return sfr_lambda(step, self.phase_a_steps, self.ramp_steps, self.lambda_max)


@dataclass
class SFRTrainingArguments(SFRArguments, TrainingArguments):
    """``TrainingArguments`` plus what SFR needs (:class:`SFRArguments`) and what ``sfr train`` loads (model,
    data, LoRA)."""

    model: str | None = field(default=None, metadata={"help": (
        "model to fine-tune: a Hugging Face name or local path; unset or 'sfr-tiny' = the embedded tiny LM")})
    data: str | None = field(default=None, metadata={"help": (
        "training data: any file `sfr prepare --data` reads (chat or prompt/completion JSONL/JSON, a "
        "Synthetic-Persona-Chat CSV, HumanEval/MBPP; prepared and cached automatically) or a directory "
        "written by `sfr prepare`; unset = the embedded persona corpus")})
    max_length: int | None = field(default=None, metadata={"help": (
        "truncate tokenised examples to this many tokens; unset = the model's context (max_position_embeddings)")})
    lora_r: int | None = field(default=None, metadata={"help": (
        "train LoRA adapters of this rank on the backbone (peft) instead of all its weights; the head trains in "
        "full. OUTPUT_DIR then holds the adapter (PeftModel.from_pretrained) and sfr_head/; unset = full fine-tuning")})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling alpha; unset = 2 * lora_r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA adapters' input"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": (
        "modules that get adapters: all-linear (every linear layer but the output layer) or comma-separated "
        "module names such as q_proj,v_proj")})
    merge_lora: bool = field(default=False, metadata={"help": (
        "with --lora-r: also write OUTPUT_DIR/merged/, the base model with the adapter merged in (a plain "
        "transformers model) and a copy of sfr_head/")})
    attn_implementation: str | None = field(default=None, metadata={"help": (
        "attention of the loaded model; unset = flash_attention_2 when flash-attn is installed, CUDA is up "
        "and training is in bf16/fp16, else sdpa")})
    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "train into an --output-dir that holds a previous run, replacing its model (its checkpoint-* folders "
        "stay, and save_total_limit may rotate them away); without it such a run is refused")})

    # Defaults that differ from TrainingArguments'.
    logging_steps: float = field(default=10, metadata={"help": "log every N optimizer steps"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the anchor columns for the collator"})
    prediction_loss_only: bool = field(default=True, metadata={"help": "evaluation reports losses only"})

    def __post_init__(self):
        self.check_sfr_arguments()
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be a positive number of optimizer steps, or -1 to train for "
                             f"num_train_epochs, got {self.max_steps}")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.per_device_train_batch_size < 1:
            raise ValueError(f"per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.merge_lora and self.lora_r is None:
            raise ValueError("merge_lora needs LoRA adapters: pass --lora-r")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        super().__post_init__()

    @classmethod
    def for_embedded_default(cls, **overrides) -> SFRTrainingArguments:
        """Arguments for the tiny embedded model: :func:`tiny_defaults` of the run's ``max_steps``
        updated with ``overrides`` (explicit warm-up and phase lengths win over the scaled ones)."""
        return cls(**{**tiny_defaults(overrides.get("max_steps")), **overrides})
