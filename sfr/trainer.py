"""Training with Hugging Face ``Trainer``: arguments, the SFR trainer, and the ``train()`` Python API.

``SFRTrainer`` adds to ``transformers.Trainer``:

* loss scaling: the summed CE is divided by the labelled-token count and the summed SFR loss by the
  anchor count (or anchor-weight sum) of the whole accumulated, all-device batch, so ``k``
  accumulated micro-batches give the gradients of one batch ``k`` times larger;
* the lambda schedule and the per-micro-batch Philox seeds, both pure functions of
  ``(seed, global_step, micro_step, rank)`` (:mod:`sfr.schedule`), hence resume-safe;
* gradient clipping of the backbone and the head separately, so that in phase A the backbone's
  update is exactly SFT's;
* ``ce_loss``, ``sfr_loss`` and ``sfr_lambda`` in the logs (averaged over ranks and logging steps);
* saving: a checkpoint or the final output holds the backbone as a plain transformers model
  (``save_pretrained``) and the head in ``sfr_head/``; checkpoints also hold the EMA teacher in
  ``sfr_teacher/`` next to the optimizer, scheduler and RNG state, and resuming restores all of them.

:func:`train` is the Python API behind ``sfr train``: load (or take) a model and data, check every
input, train, save, and return a :class:`TrainResult`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sfr.checks import check_output_dir
from sfr.config import SFRConfig
from sfr.model import (
    CE_BACKENDS,
    HEAD_DIR,
    HEAD_WEIGHTS,
    LOSS_BACKENDS,
    OBJECTIVES,
    TARGET_SOURCES,
    SFRModel,
    default_head_width,
    find_decoder,
    find_lm_head,
)
from sfr.schedule import device_seed, sfr_lambda
from sfr.targets import SEGMENT_MODES
from sfr_kernels import triton_runs_on
from sfr_kernels.reference import TIME_SAMPLINGS

TEACHER_DIR = "sfr_teacher"
TEACHER_WEIGHTS = "model.safetensors"

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
_SCALED_WITH_MAX_STEPS = ("warmup_steps", "phase_a_steps", "ramp_steps")


def tiny_defaults(max_steps: int | None = None) -> dict:
    """:data:`TINY_DEFAULTS` for a run of ``max_steps`` optimizer steps.

    Warm-up and the SFR phase lengths keep their proportions of the 200-step default (warm-up 5 %,
    phase A 20 %, ramp 30 %, rounded), so a short run still reaches lambda_max instead of ending inside
    phase A. ``None`` or ``max_steps <= 0`` (a run by epochs) keeps the defaults as they are.
    """
    values = dict(TINY_DEFAULTS)
    if max_steps is not None and max_steps > 0 and max_steps != TINY_DEFAULTS["max_steps"]:
        scale = max_steps / TINY_DEFAULTS["max_steps"]
        values.update({name: round(TINY_DEFAULTS[name] * scale) for name in _SCALED_WITH_MAX_STEPS})
        values["max_steps"] = max_steps
    return values


@dataclass
class SFRTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus what SFR needs (model, data, objective, schedule, head, targets).

    The head/objective fields are those of :class:`sfr.SFRConfig` (``head_width`` None picks
    :func:`sfr.model.default_head_width`, ``min(1024, max(2 D, E))``).
    """

    model: str | None = field(default=None, metadata={"help": (
        "model to fine-tune: a Hugging Face name or local path; unset or 'sfr-tiny' = the embedded tiny LM")})
    data: str | None = field(default=None, metadata={"help": (
        "training data: a JSONL/JSON file of chat examples (prepared and cached automatically) or a directory "
        "written by `sfr prepare`; unset = the embedded persona corpus")})
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
    encoder: str | None = field(default=None, metadata={"help": (
        "sentence encoder for the targets when raw data is prepared (default: the one `sfr prepare` uses)")})
    max_length: int | None = field(default=None, metadata={"help": (
        "truncate tokenised examples to this many tokens; unset = the model's context (max_position_embeddings)")})
    segment_tokens: int = field(default=32, metadata={"help": "K: tokens of an anchor's future segment (preparing raw data)"})
    anchor_stride: int = field(default=8, metadata={"help": "S: an anchor every S response tokens (preparing raw data)"})
    min_segment_tokens: int = field(default=4, metadata={"help": "m: shorter segments are dropped (preparing raw data)"})
    segment_mode: str = field(default="window", metadata={"choices": SEGMENT_MODES, "help": (
        "window (K tokens) or sentence (up to the sentence end, at most K tokens) (preparing raw data)")})
    ce_backend: str = field(default="auto", metadata={"choices": CE_BACKENDS, "help": (
        "auto (Liger fused linear CE on CUDA when installed, else lm_head + CE), liger or torch")})
    loss_backend: str = field(default="auto", metadata={"choices": LOSS_BACKENDS, "help": (
        "sfr_loss backend: auto (Triton on CUDA, PyTorch reference elsewhere), triton or torch")})
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
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.target_source not in TARGET_SOURCES:
            raise ValueError(f"target_source must be one of {TARGET_SOURCES}, got {self.target_source!r}")
        if self.target_source == "ema" and self.objective == "sft":
            raise ValueError("target_source='ema' needs a head: use objective 'sfr' or 'mtp'")
        for name in ("phase_a_steps", "ramp_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be a positive number of optimizer steps, or -1 to train for "
                             f"num_train_epochs, got {self.max_steps}")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.per_device_train_batch_size < 1:
            raise ValueError(f"per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
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
        super().__post_init__()

    def sfr_config(self, hidden_size: int, embed_dim: int | None = None) -> SFRConfig:
        """The :class:`SFRConfig` of these arguments for a backbone of hidden size ``D`` and targets of dim ``E``."""
        width = self.head_width if self.head_width is not None else default_head_width(hidden_size, embed_dim)
        return SFRConfig(head_width=width, head_depth=self.head_depth, time_features=self.time_features,
                         num_samples=self.num_samples, source_std=self.source_std,
                         time_sampling=self.time_sampling, time_mean=self.time_mean, time_std=self.time_std,
                         reduction="sum")

    def lambda_at(self, step: int) -> float:
        """``lambda`` at optimizer step ``step`` (0-based): :func:`sfr.schedule.sfr_lambda` of these arguments."""
        return sfr_lambda(step, self.phase_a_steps, self.ramp_steps, self.lambda_max)

    @classmethod
    def for_embedded_default(cls, **overrides) -> SFRTrainingArguments:
        """Arguments for the tiny embedded model: :func:`tiny_defaults` of the run's ``max_steps``
        updated with ``overrides`` (explicit warm-up and phase lengths win over the scaled ones)."""
        return cls(**{**tiny_defaults(overrides.get("max_steps")), **overrides})


class PhaseCheckCallback(TrainerCallback):
    """At the start of training, warn when the run ends before the SFR gradient reaches lambda_max.

    The commonest cause is a short ``--max-steps`` with the default phase lengths: the run then ends in
    phase A (lambda = 0, the backbone is trained by CE alone, as in SFT) or part-way up the ramp.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if args.objective == "sft" or args.lambda_max == 0 or not state.max_steps or state.max_steps <= 0:
            return
        final = args.lambda_at(state.max_steps - 1)
        if final >= args.lambda_max:
            return
        if final == 0:
            what = (f"phase A (phase_a_steps={args.phase_a_steps}) covers all {state.max_steps} optimizer steps: "
                    f"the SFR loss trains only the head, never the backbone")
        else:
            what = (f"the run ends at step {state.max_steps} with lambda = {final:.3g}, before the ramp "
                    f"(phase_a_steps={args.phase_a_steps}, ramp_steps={args.ramp_steps}) reaches "
                    f"lambda_max={args.lambda_max:g}")
        message = f"sfr train: {what}; shorten --phase-a-steps / --ramp-steps for a run this short"
        # Shown once, attributed to this line: a higher stacklevel would name transformers' callback handler.
        warnings.warn(message, UserWarning, stacklevel=1)


class EMAUpdateCallback(TrainerCallback):
    """After every optimizer step: ``teacher <- decay teacher + (1 - decay) student``."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model)
        if isinstance(model, SFRModel) and model.teacher is not None:
            model.teacher.update(model.decoder)


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class SFRTrainer(Trainer):
    """``Trainer`` for an :class:`~sfr.model.SFRModel` and :class:`SFRTrainingArguments`."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated-batch counts itself

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(_unwrap(self.model), SFRModel):
            raise TypeError(f"model must be an sfr.model.SFRModel, got {type(self.model).__name__}")
        if not isinstance(self.args, SFRTrainingArguments):
            raise TypeError(f"args must be SFRTrainingArguments, got {type(self.args).__name__}")
        if self.args.n_gpu > 1:
            raise ValueError("SFRTrainer does not support torch.nn.DataParallel (several GPUs in one process): "
                             "launch with torchrun or accelerate launch (DDP/FSDP/DeepSpeed), one process per GPU")
        if self.args.load_best_model_at_end:
            raise ValueError("load_best_model_at_end is not supported by SFRTrainer")
        if self.args.label_smoothing_factor or self.compute_loss_func is not None:
            raise ValueError("SFRTrainer computes CE + SFR inside SFRModel.forward: label_smoothing_factor and "
                             "compute_loss_func are not supported")
        self.add_callback(PhaseCheckCallback)
        self.model_accepts_loss_kwargs = True
        self._num_anchors_in_batch = None
        self._micro_step = 0
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_steps = 0
        self._last_lambda = 0.0

    # ---- counts of the accumulated batch -------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The micro-batches of one optimizer step, and the token count that CE is divided by.

        Also stores the anchor count (or anchor-weight sum) that SFR is divided by. Both are summed
        over the micro-batches and all ranks, then divided by the number of processes: DDP averages
        gradients over ranks, so a rank's summed loss divided by ``count / world`` gives exactly the
        gradient of the all-device mean. (This replaces the Trainer's own token count, which depends on
        ``average_tokens_across_devices``; here the division is always by the all-device count.)
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        self._micro_step = 0
        self._metric_steps += 1
        if not batch_samples:
            self._num_anchors_in_batch = None
            return batch_samples, None
        counts = torch.zeros(2, dtype=torch.float32, device=self.args.device)  # [tokens, anchors]
        for batch in batch_samples:
            counts[0] += batch["labels"][..., 1:].ne(-100).sum().to(counts.device)
            if batch.get("anchor_weight") is not None:
                counts[1] += batch["anchor_weight"].sum().to(device=counts.device, dtype=torch.float32)
            elif batch.get("anchor_index") is not None:
                counts[1] += batch["anchor_index"].shape[0]
        world = self.accelerator.num_processes
        if world > 1:
            counts = self.accelerator.gather(counts.reshape(1, 2)).sum(0)  # one collective for both counts
        counts = counts / world
        self._num_anchors_in_batch = counts[1]
        return batch_samples, counts[0]

    # ---- gradient clipping -------------------------------------------------------------------------
    def _clip_grad_norm(self, model):
        """Clip the backbone's and the head's gradients separately; return the backbone's pre-clip norm.

        A global norm would let the head's gradient change the backbone's clipping factor, so even at
        lambda = 0 the backbone's update would differ from SFT's. FSDP and DeepSpeed clip inside their
        engines: there the Trainer's global clipping is kept.
        """
        from accelerate.utils import DistributedType

        wrapper = _unwrap(self.accelerator.unwrap_model(model))
        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if sharded or wrapper.head is None or not hasattr(self.accelerator, "unscale_gradients"):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # once: fp16 loss scaling must be undone before clipping
        max_norm = self.args.max_grad_norm
        backbone_norm = torch.nn.utils.clip_grad_norm_(list(wrapper.backbone.parameters()), max_norm)
        torch.nn.utils.clip_grad_norm_(list(wrapper.head.parameters()), max_norm)
        return backbone_norm

    # ---- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One micro-batch's ``L_CE + L_SFR`` at ``lambda = lambda_at(global_step)``.

        The Philox seed is ``step_seed(seed, global_step, micro_step, rank)`` (:mod:`sfr.schedule`), a
        0-dim int64 tensor made on the device. In training the losses are divided by the counts of the
        accumulated, all-device batch (:meth:`get_batch_samples`); in evaluation by this batch's.
        """
        step = int(self.state.global_step)
        lam = self.args.lambda_at(step)
        training = model.training
        micro = self._micro_step if training else 0
        seed = device_seed(self.args.seed, step, micro, self.args.process_index, device=self.args.device)
        counts = {}
        if training and num_items_in_batch is not None:
            counts = dict(num_items_in_batch=num_items_in_batch, num_anchors_in_batch=self._num_anchors_in_batch)
        outputs = model(**inputs, sfr_lambda=lam, sfr_seed=seed, **counts)
        if training:
            self._micro_step += 1
            self._last_lambda = lam
            for name in ("ce_loss", "sfr_loss"):
                value = getattr(outputs, name)
                if value is not None:
                    previous = self._metric_sums.get(name)
                    self._metric_sums[name] = value.float() if previous is None else previous + value.float()
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Add ``ce_loss``, ``sfr_loss`` (mean over ranks and steps since the last log) and ``sfr_lambda``."""
        if "loss" in logs and self._metric_steps > 0:
            for name, total in self._metric_sums.items():
                value = self.accelerator.reduce(total.detach().clone(), reduction="mean")
                logs[name] = round(float(value) / self._metric_steps, 6)
            if isinstance(_unwrap(self.model), SFRModel) and _unwrap(self.model).head is not None:
                logs["sfr_lambda"] = round(self._last_lambda, 6)
            self._metric_sums = {}
            self._metric_steps = 0
        super().log(logs, *args, **kwargs)

    # ---- saving and loading -----------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The backbone via ``save_pretrained`` (a plain transformers model, no head keys), the head to ``sfr_head/``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        _unwrap(self.accelerator.unwrap_model(self.model)).save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Checkpoints only: the Trainer's optimizer/scheduler state plus the EMA teacher (``sfr_teacher/``).

        The teacher is training state, like the optimizer: the final model does not need it. FSDP and
        DeepSpeed save the whole module (teacher included) in their own checkpoint files.
        """
        super()._save_optimizer_and_scheduler(output_dir)
        model = _unwrap(self.accelerator.unwrap_model(self.model))
        if model.teacher is None or not self.args.should_save or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return
        from safetensors.torch import save_file

        teacher_dir = Path(output_dir) / TEACHER_DIR
        teacher_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.teacher.state_dict().items()}
        save_file(_untie(tensors), str(teacher_dir / TEACHER_WEIGHTS), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore backbone, head and teacher weights from a checkpoint written by this trainer.

        Under FSDP the Trainer restores the whole wrapped module from its own FSDP checkpoint files.
        """
        from safetensors.torch import load_file

        if self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        wrapper = _unwrap(self.accelerator.unwrap_model(model if model is not None else self.model))
        _load_backbone(wrapper.backbone, resume_from_checkpoint)
        if wrapper.head is not None:
            head_file = Path(resume_from_checkpoint) / HEAD_DIR / HEAD_WEIGHTS
            if not head_file.is_file():
                raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} has no {HEAD_DIR}/{HEAD_WEIGHTS} "
                                 f"(was it written by an sft run?)")
            wrapper.head.load_state_dict(load_file(str(head_file)), strict=True)
        if wrapper.teacher is not None:
            teacher_file = Path(resume_from_checkpoint) / TEACHER_DIR / TEACHER_WEIGHTS
            if not teacher_file.is_file():
                raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} has no {TEACHER_DIR}/ "
                                 "(the EMA teacher); it was not written by a target_source=ema run")
            wrapper.teacher.load_state_dict(load_file(str(teacher_file)), strict=True)


def _untie(tensors: dict) -> dict:
    """Clone tensors that share storage (safetensors refuses shared tensors)."""
    seen, out = set(), {}
    for key, value in tensors.items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def _load_backbone(backbone: torch.nn.Module, folder: str) -> None:
    """Load ``model.safetensors`` (or a sharded index) into ``backbone``; tied weights may be absent."""
    from safetensors.torch import load_file

    single = Path(folder) / "model.safetensors"
    if single.is_file():
        result = backbone.load_state_dict(load_file(str(single)), strict=False)
    else:
        try:
            from transformers.trainer_utils import load_sharded_checkpoint
        except ImportError:  # transformers < 5
            from transformers.modeling_utils import load_sharded_checkpoint
        if not (Path(folder) / "model.safetensors.index.json").is_file():
            raise ValueError(f"resume_from_checkpoint: no model.safetensors in {folder}")
        result = load_sharded_checkpoint(backbone, folder, strict=False)
    # A missing key is fine only when its tensor is tied to one that was loaded (lm_head <-> embeddings).
    state = backbone.state_dict()
    loaded_ptrs = {state[k].data_ptr() for k in state if k not in set(result.missing_keys)}
    untied_missing = [k for k in result.missing_keys if state[k].data_ptr() not in loaded_ptrs]
    if untied_missing or result.unexpected_keys:
        raise ValueError(f"resume_from_checkpoint: {folder} does not match the model: missing {untied_missing}, "
                         f"unexpected {list(result.unexpected_keys)}")


# ---- the Python API -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns: where the model went, the Trainer's log history, final metrics.

    ``metrics`` holds the Trainer's ``train_*`` metrics, ``train_wall_s`` and the last logged
    ``final_loss`` / ``final_ce_loss`` / ``final_sfr_loss`` / ``final_sfr_lambda``; ``global_step`` is
    the number of optimizer steps the model has had (those of a resumed run included).
    """

    output_dir: str
    log_history: list[dict]
    metrics: dict
    global_step: int = 0


def resolve_checkpoint(value: str | None, output_dir: str | None) -> str | None:
    """``resume_from_checkpoint``: a checkpoint folder, ``"latest"`` (the newest in ``output_dir``) or None."""
    if value is None or value is False or value == "":
        return None
    if value is True or str(value).lower() in ("latest", "last", "true"):
        from transformers.trainer_utils import get_last_checkpoint

        latest = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
        if latest is None:
            raise ValueError(f"resume_from_checkpoint='latest': no checkpoint-* folder in {output_dir!r}")
        return latest
    if not os.path.isdir(value):
        raise ValueError(f"resume_from_checkpoint: {value!r} is not a directory")
    if not (Path(value) / "trainer_state.json").is_file():
        raise ValueError(f"resume_from_checkpoint: {value!r} is not a Trainer checkpoint (no trainer_state.json)")
    return str(value)


def attention_implementation(requested: str | None = None, half_precision: bool = False) -> str:
    """``requested``; else ``flash_attention_2`` when flash-attn 2 is installed, CUDA is up and training runs
    in bf16/fp16 (its kernels have no float32 path); else ``sdpa``."""
    if requested:
        return requested
    from transformers.utils import is_flash_attn_2_available

    if half_precision and torch.cuda.is_available() and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def load_model_and_tokenizer(name: str | None, attn_implementation: str | None = None):
    """``(model, tokenizer)`` for a hub name / local path; None or ``"sfr-tiny"`` = the embedded tiny LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfr.tiny_lm import resolve_model_name_or_path

    path = resolve_model_name_or_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention_implementation(attn_implementation))
    return model, tokenizer


def _say(message: str) -> None:
    print(f"[sfr train] {message}", file=sys.stderr, flush=True)


def train(args: SFRTrainingArguments, model=None, data=None, tokenizer=None, callbacks=None) -> TrainResult:
    """Fine-tune with CE + SFR (or SFT / MTP) and save a plain transformers model plus ``sfr_head/``.

    Args:
        args: the arguments (``args.model`` / ``args.data`` are used when ``model`` / ``data`` are None).
        model: None (load ``args.model``; unset = the embedded tiny LM), a name or path, a causal LM
            (``PreTrainedModel``) or a ready :class:`SFRModel` (its objective and target source must
            match ``args``).
        data: None (``args.data``; unset = the embedded persona corpus), a path (raw chat data, prepared
            and cached with :func:`sfr.targets.prepare`, or a directory written by ``sfr prepare``) or a
            prepared ``datasets.Dataset``.
        tokenizer: the tokenizer (default: loaded with the model, or from ``args.model`` / the model's
            ``name_or_path`` for a model object).
        callbacks: extra ``TrainerCallback`` objects.

    Returns:
        :class:`TrainResult` with ``output_dir``, the Trainer's ``log_history`` and the final metrics.

    Every check that can fail (arguments, output directory, checkpoint, model layout, tokenizer, token
    ids, target dimension) runs before the first training step, the cheap ones before any model is
    loaded or data is prepared. An ``output_dir`` that holds a previous run is refused unless the run
    resumes (``resume_from_checkpoint``) or replaces it (``overwrite_output_dir``). A run that fails
    removes the output directory again when it created it and wrote nothing there.
    """
    if not isinstance(args, SFRTrainingArguments):
        raise TypeError(f"args must be SFRTrainingArguments, got {type(args).__name__}")
    output_dir = check_output_dir(args.output_dir)
    _check_loss_backend(args, model)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is None:
        _check_previous_run(output_dir, args.overwrite_output_dir)
    else:
        _check_steps_left(checkpoint, args.max_steps)
    created = _outermost_missing(output_dir)
    try:
        return _train(args, checkpoint, model, data, tokenizer, callbacks)
    except BaseException:
        if created is not None:
            _remove_if_empty(created)
        raise


def _train(args: SFRTrainingArguments, checkpoint: str | None, model, data, tokenizer, callbacks) -> TrainResult:
    """:func:`train` once the output directory and the checkpoint are known to be usable."""
    saved_dim = _head_embed_dim_in_checkpoint(checkpoint) if checkpoint else None
    if checkpoint and args.objective != "sft" and saved_dim is None:
        raise ValueError(f"resume_from_checkpoint: {checkpoint} has no {HEAD_DIR}/ (was it written by an sft run?)")

    from sfr.tiny_lm import DEFAULT_MODEL, resolve_model_name_or_path

    embedded = False  # the embedded tiny LM, loaded here
    if model is None or isinstance(model, (str, os.PathLike)):
        model_name = model if model is not None else args.model
        embedded = model_name in (None, DEFAULT_MODEL)
        attn = attention_implementation(args.attn_implementation, half_precision=args.bf16 or args.fp16)
        backbone, loaded_tokenizer = load_model_and_tokenizer(model_name, attn)
        tokenizer_source = model_name  # None = the embedded tiny LM, as sfr prepare understands it
        tokenizer = tokenizer or loaded_tokenizer
        model_label = model_name or DEFAULT_MODEL
    else:
        backbone = model.backbone if isinstance(model, SFRModel) else model
        model_label = args.model or getattr(backbone, "name_or_path", None) or "<this model>"
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_name_or_path(args.model or getattr(backbone, "name_or_path", None) or None))
        tokenizer_source = getattr(tokenizer, "name_or_path", None) or args.model
    if isinstance(model, SFRModel):
        if model.objective != args.objective or model.target_source != args.target_source:
            raise ValueError(f"model: the given SFRModel trains objective={model.objective!r} with "
                             f"target_source={model.target_source!r}, args say {args.objective!r} / {args.target_source!r}")
    else:
        find_decoder(backbone)  # the final hidden states must be reachable: fail before preparing data
    find_lm_head(backbone)
    _check_tokenizer(tokenizer, backbone)

    dataset, embed_dim = load_training_data(args, tokenizer_source, data)
    _check_token_ids(dataset, backbone, model_label)
    if args.objective != "sft":
        if embed_dim is None:
            raise ValueError(f"data: objective {args.objective!r} needs prepared targets (anchor_targets), found none")
        if saved_dim is not None and saved_dim != embed_dim:
            raise ValueError(f"resume_from_checkpoint: {checkpoint} holds a head with E={saved_dim}, "
                             f"the data has E={embed_dim}")

    if isinstance(model, SFRModel):
        sfr_model = model
    else:
        # The head's random init, seeded by --seed: the Trainer seeds only when it is built (after the
        # model), and torch's own start-up seed differs from process to process.
        torch.manual_seed(args.seed)
        sfr_model = SFRModel.from_backbone(
            backbone, embed_dim, objective=args.objective,
            sfr_config=args.sfr_config(find_lm_head(backbone).weight.shape[1], embed_dim),
            target_source=args.target_source, ema_decay=args.ema_decay, projection_seed=args.projection_seed,
            ce_backend=args.ce_backend, loss_backend=args.loss_backend)
    if sfr_model.head is not None and sfr_model.head.embed_dim != embed_dim:
        raise ValueError(f"data: the prepared targets have E={embed_dim} but the flow head expects "
                         f"E={sfr_model.head.embed_dim} (prepare the data with the head's encoder)")

    from sfr.collator import SFRDataCollator

    collator = SFRDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=_max_length(args, backbone, dataset),
                               embed_dim=embed_dim)
    extra = list(callbacks or [])
    if sfr_model.teacher is not None:
        extra.append(EMAUpdateCallback())
    trainer = SFRTrainer(model=sfr_model, args=args, train_dataset=dataset, data_collator=collator,
                         processing_class=tokenizer, callbacks=extra)
    attn = getattr(backbone.config, "_attn_implementation", None) or "default"
    ce_path = {"liger": "liger fused linear CE", "torch": "lm_head + CE"}[sfr_model.ce_implementation(args.device)]
    head = sfr_model.head
    _say(f"objective={args.objective} target_source={sfr_model.target_source} device={args.device} attention={attn} "
         f"ce={ce_path} examples={len(dataset)}"
         + (f" head={sum(p.numel() for p in head.parameters()):,} params (E={embed_dim}, width={head.width})"
            if head is not None else ""))
    if checkpoint:
        _say(f"resuming from {checkpoint}")

    threads = torch.get_num_threads()
    if embedded and args.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The embedded model is tiny: its steps are overhead-bound, and OpenMP threads that spin while
        # the other cores are busy make them up to ~7x slower (measured: 200 steps in 16 s on one
        # thread, 121 s on two, on a 2-core machine with other work running).
        torch.set_num_threads(1)
        _say("embedded model on the CPU: 1 intra-op thread (set OMP_NUM_THREADS to choose)")
    started = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        torch.set_num_threads(threads)
    trainer.save_model(args.output_dir)  # the plain transformers model + sfr_head/ (no optimizer, no teacher)
    metrics = dict(output.metrics)
    metrics["train_wall_s"] = round(time.perf_counter() - started, 2)
    last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
    for name in ("loss", "ce_loss", "sfr_loss", "sfr_lambda"):
        if name in last:
            metrics[f"final_{name}"] = last[name]
    if trainer.args.should_save:
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    return TrainResult(output_dir=str(args.output_dir), log_history=list(trainer.state.log_history), metrics=metrics,
                       global_step=int(trainer.state.global_step))


# Files that a run (or a trainer.save_model) leaves in its output directory.
_RUN_FILES = ("trainer_state.json", TRAINING_ARGS_NAME, "model.safetensors", "model.safetensors.index.json", HEAD_DIR)


def _check_previous_run(output_dir: Path, overwrite: bool) -> None:
    """Refuse an ``output_dir`` that holds a run (checkpoints or a saved model) unless ``overwrite`` is set.

    A new run there would overwrite the model and, through ``save_total_limit``, delete the old
    run's checkpoints.
    """
    if not output_dir.is_dir():
        return
    checkpoints = sorted(p.name for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    found = checkpoints + [name for name in _RUN_FILES if (output_dir / name).exists()]
    if not found:
        return
    if overwrite:
        _say(f"--overwrite-output-dir: replacing the run in {output_dir}"
             + (f"; its {len(checkpoints)} checkpoint-* folders stay, and save_total_limit may rotate them away"
                if checkpoints else ""))
        return
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    raise ValueError(f"--output-dir {output_dir} holds a run ({shown}): pass --resume-from-checkpoint latest to "
                     "continue it, --overwrite-output-dir to replace it, or another --output-dir")


def _check_steps_left(checkpoint: str, max_steps: int) -> None:
    """Refuse to resume a checkpoint that already reached ``max_steps`` (the Trainer would run a step
    past it at learning rate 0 and save it as a new checkpoint)."""
    state = Path(checkpoint) / "trainer_state.json"
    if max_steps <= 0 or not state.is_file():
        return
    try:
        step = int(json.loads(state.read_text()).get("global_step", 0))
    except (ValueError, TypeError):
        return  # an unreadable state is the Trainer's to report
    if step >= max_steps:
        raise ValueError(f"resume_from_checkpoint: {checkpoint} is at step {step} >= --max-steps {max_steps}: "
                         f"nothing left to train (raise --max-steps to continue the run)")


def _check_loss_backend(args: SFRTrainingArguments, model) -> None:
    """Fail now, not at the first step, when ``loss_backend='triton'`` cannot run on the training device."""
    backend = model.loss_backend if isinstance(model, SFRModel) else args.loss_backend
    if backend != "triton" or args.objective == "sft" or triton_runs_on(args.device):
        return
    raise ValueError(f"--loss-backend triton: the Triton kernels need CUDA and this run's device is {args.device} "
                     "(on the CPU they run only in the interpreter: set TRITON_INTERPRET=1 before starting); "
                     "use --loss-backend auto or torch")


def _outermost_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (the first one a run creates), or None."""
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` when it holds no file at all (only empty folders): what a failed run left there."""
    if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def _check_tokenizer(tokenizer, backbone) -> None:
    """A pad token (the eos token when there is none) and a vocabulary that fits the model's embeddings."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer: it has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    embeddings = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ValueError(f"tokenizer: its {len(tokenizer)} tokens do not fit the model's {rows} embeddings "
                         "(a tokenizer of another model?)")


def _token_columns(dataset):
    """The ``input_ids`` and ``labels`` columns of a ``datasets.Dataset`` as Arrow arrays (no copy of the rows)."""
    table = dataset.with_format("arrow")[:]
    return {name: table.column(name) for name in ("input_ids", "labels") if name in table.column_names}


def _check_token_ids(dataset, backbone, model_label: str) -> None:
    """The data's input ids must index the model's input embeddings, and its labels the model's logits.

    Data prepared with another model's tokenizer fails here instead of inside ``F.embedding`` at step 1.
    """
    import pyarrow.compute as pc

    if len(dataset) == 0:
        return
    embeddings = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    sizes = {"input_ids": ("input embeddings", getattr(embeddings, "num_embeddings", None)),
             "labels": ("output logits", getattr(find_lm_head(backbone), "out_features", None))}
    for name, column in _token_columns(dataset).items():
        what, size = sizes[name]
        largest = pc.max(pc.list_flatten(column)).as_py()
        if size is not None and largest is not None and largest >= size:
            raise ValueError(f"data: its {name} reach token id {largest} but the model has {size} {what} (data "
                             f"prepared with another tokenizer?); prepare it again with --model {model_label}")


def _max_length(args: SFRTrainingArguments, backbone, dataset) -> int | None:
    """The collator's ``max_length``: ``args.max_length``, else the model's context (``max_position_embeddings``).

    Says once how many examples are longer, hence truncated (the collator keeps an anchor only when
    its first segment token survives).
    """
    context = getattr(getattr(backbone, "config", None), "max_position_embeddings", None)
    limit = args.max_length or (context if isinstance(context, int) and context >= 2 else None)
    column = _token_columns(dataset).get("input_ids") if limit else None
    if column is None:
        return limit
    import pyarrow.compute as pc

    longer = pc.sum(pc.greater(pc.list_value_length(column), limit)).as_py() or 0
    if longer:
        why = "--max-length" if args.max_length else f"warning: the model's context (max_position_embeddings={limit})"
        _say(f"{why}: {longer} of {len(dataset)} examples are longer than {limit} tokens and are truncated to it "
             "(anchors past it are dropped)")
    return limit


def _head_embed_dim_in_checkpoint(checkpoint: str) -> int | None:
    config = Path(checkpoint) / HEAD_DIR / "config.json"
    if not config.is_file():
        return None
    return int(json.loads(config.read_text())["head"]["embed_dim"])


def load_training_data(args: SFRTrainingArguments, tokenizer_source: str | None, data=None):
    """``(dataset, embed_dim)``: a prepared data set (the columns of :func:`sfr.targets.prepare`) and its E.

    ``data`` (or ``args.data``): a ``datasets.Dataset`` already prepared, a directory written by
    ``sfr prepare``, or raw chat data, prepared now with the model's tokenizer (``tokenizer_source``)
    and cached; None = the embedded persona corpus.
    """
    from datasets import Dataset, load_from_disk

    from sfr import targets

    data = data if data is not None else args.data
    if isinstance(data, Dataset):
        return data, _embed_dim_of(data)
    if data is not None and (Path(data) / targets.METADATA_FILE).is_file():
        meta = json.loads((Path(data) / targets.METADATA_FILE).read_text())
        from sfr.tiny_lm import resolve_model_name_or_path

        if meta.get("tokenizer") not in (None, resolve_model_name_or_path(tokenizer_source)):
            _say(f"warning: {data} was prepared with the tokenizer {meta['tokenizer']!r}, the model's is "
                 f"{resolve_model_name_or_path(tokenizer_source)!r}: make sure they are the same")
        return load_from_disk(str(data)), int(meta["embed_dim"])
    prepared = targets.prepare(data, model=tokenizer_source, encoder=args.encoder,
                               segment_tokens=args.segment_tokens, anchor_stride=args.anchor_stride,
                               min_segment_tokens=args.min_segment_tokens, segment_mode=args.segment_mode,
                               max_length=args.max_length, progress=not args.disable_tqdm)
    return prepared.dataset, int(prepared.metadata["embed_dim"])


def _embed_dim_of(dataset) -> int | None:
    """E of a prepared ``datasets.Dataset``: from its features when fixed-length, else its first anchor."""
    if "anchor_targets" not in dataset.column_names:
        return None
    inner = getattr(dataset.features["anchor_targets"], "feature", None)
    if getattr(inner, "length", -1) not in (None, -1):
        return int(inner.length)
    for row in dataset:
        if row["anchor_targets"]:
            return len(row["anchor_targets"][0])
    return None
