"""Training with Hugging Face ``Trainer``: arguments, the SFR trainer, and the ``train()`` Python API.

``SFRTrainer`` adds to ``transformers.Trainer``:

* loss scaling: the summed CE is divided by the labelled-token count and the summed SFR loss by the
  anchor count (or anchor-weight sum) of the whole accumulated, all-device batch, so ``k``
  accumulated micro-batches give the gradients of one batch ``k`` times larger;
* the lambda schedule and the per-micro-batch Philox seeds, both pure functions of
  ``(seed, global_step, micro_step, rank)`` (:mod:`sfr.schedule`), hence resume-safe;
* ``ce_loss``, ``sfr_loss`` and ``sfr_lambda`` in the logs (averaged over ranks and logging steps);
* saving: a checkpoint or the final output holds the backbone as a plain transformers model
  (``save_pretrained``), the head in ``sfr_head/`` and (checkpoints only) the EMA teacher in
  ``sfr_teacher/``; resuming restores all three plus optimizer, scheduler and RNG state.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from sfr.config import SFRConfig
from sfr.model import (
    HEAD_DIR,
    HEAD_WEIGHTS,
    OBJECTIVES,
    TARGET_SOURCES,
    SFRModel,
    default_head_width,
    save_flow_head,
)
from sfr.schedule import device_seed, sfr_lambda
from sfr_kernels.reference import TIME_SAMPLINGS

logger = logging.getLogger(__name__)

TEACHER_DIR = "sfr_teacher"
TEACHER_WEIGHTS = "model.safetensors"

# Settings that suit the embedded default (a tiny LM on the persona corpus, CPU, a few minutes).
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
    max_length: int | None = field(default=None, metadata={"help": "truncate tokenised examples to this many tokens"})
    segment_tokens: int = field(default=32, metadata={"help": "K: tokens of an anchor's future segment (preparing raw data)"})
    anchor_stride: int = field(default=8, metadata={"help": "S: an anchor every S response tokens (preparing raw data)"})
    min_segment_tokens: int = field(default=4, metadata={"help": "m: shorter segments are dropped (preparing raw data)"})
    segment_mode: str = field(default="window", metadata={"choices": ("window", "sentence"), "help": "window (K tokens) or sentence (up to the sentence end)"})
    ce_backend: str = field(default="auto", metadata={"choices": ("auto", "liger", "torch"), "help": (
        "auto (Liger fused linear CE on CUDA when installed, else lm_head + CE), liger or torch")})
    loss_backend: str = field(default="auto", metadata={"choices": ("auto", "triton", "torch"), "help": "sfr_loss backend: auto (Triton on CUDA), triton or torch"})
    attn_implementation: str | None = field(default=None, metadata={"help": (
        "attention of the loaded model; unset = flash_attention_2 when installed on CUDA, else sdpa")})

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
        if self.lambda_max < 0:
            raise ValueError(f"lambda_max must be >= 0, got {self.lambda_max}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.ce_backend not in ("auto", "liger", "torch"):
            raise ValueError(f"ce_backend must be auto, liger or torch, got {self.ce_backend!r}")
        if self.loss_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"loss_backend must be auto, triton or torch, got {self.loss_backend!r}")
        self.sfr_config(hidden_size=64)  # validates the head/objective fields now, not at step 1
        super().__post_init__()

    def sfr_config(self, hidden_size: int, embed_dim: int | None = None) -> SFRConfig:
        """The :class:`SFRConfig` of these arguments for a backbone of hidden size ``D`` and targets of dim ``E``."""
        width = self.head_width if self.head_width is not None else default_head_width(hidden_size, embed_dim)
        return SFRConfig(head_width=width, head_depth=self.head_depth, time_features=self.time_features,
                         num_samples=self.num_samples, source_std=self.source_std,
                         time_sampling=self.time_sampling, time_mean=self.time_mean, time_std=self.time_std,
                         reduction="sum")

    def lambda_at(self, step: int) -> float:
        return sfr_lambda(step, self.phase_a_steps, self.ramp_steps, self.lambda_max)

    @classmethod
    def for_embedded_default(cls, **overrides) -> SFRTrainingArguments:
        """Arguments for the tiny embedded model: :data:`TINY_DEFAULTS` updated with ``overrides``."""
        return cls(**{**TINY_DEFAULTS, **overrides})


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
        self.model_accepts_loss_kwargs = True
        self._num_anchors_in_batch = None
        self._micro_step = 0
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_steps = 0
        self._last_lambda = 0.0
        self.save_training_state = True  # teacher weights in saves; False for the final output

    # ---- counts of the accumulated batch -------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The micro-batches of one optimizer step and their labelled-token count.

        Also counts their anchors (or anchor-weight sum). Both counts are summed over all ranks and
        divided by the number of processes: DDP averages gradients over ranks, so a rank's summed loss
        divided by ``count / world`` yields exactly the gradient of the all-device mean.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        self._micro_step = 0
        self._metric_steps += 1
        if not batch_samples:
            self._num_anchors_in_batch = None
            return batch_samples, None
        device = self.args.device
        tokens = torch.zeros((), dtype=torch.float32, device=device)
        anchors = torch.zeros((), dtype=torch.float32, device=device)
        for batch in batch_samples:
            tokens = tokens + batch["labels"][..., 1:].ne(-100).sum().to(device)
            if batch.get("anchor_weight") is not None:
                anchors = anchors + batch["anchor_weight"].sum().to(device=device, dtype=torch.float32)
            elif batch.get("anchor_index") is not None:
                anchors = anchors + batch["anchor_index"].shape[0]
        world = self.accelerator.num_processes
        if world > 1:
            tokens = self.accelerator.gather(tokens.reshape(1)).sum()
            anchors = self.accelerator.gather(anchors.reshape(1)).sum()
        self._num_anchors_in_batch = anchors / world
        return batch_samples, tokens / world

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
        """Backbone via ``save_pretrained`` (no head keys), head to ``sfr_head/``, teacher to ``sfr_teacher/``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = _unwrap(self.accelerator.unwrap_model(self.model))
        if state_dict is None:
            state_dict = model.state_dict()
        parts = SFRModel.split_state_dict(state_dict)
        model.backbone.save_pretrained(output_dir, state_dict=parts["backbone"])
        if model.head is not None:
            save_flow_head(model.head, Path(output_dir) / HEAD_DIR, model.sfr_config,
                           metadata=model.head_metadata(), state_dict=parts["head"])
        if model.teacher is not None and self.save_training_state:
            from safetensors.torch import save_file

            teacher_dir = Path(output_dir) / TEACHER_DIR
            teacher_dir.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().contiguous().cpu() for k, v in parts["teacher"].items()}
            save_file(_untie(tensors), str(teacher_dir / TEACHER_WEIGHTS), metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore backbone, head and teacher weights from a checkpoint written by :meth:`_save`."""
        from safetensors.torch import load_file

        wrapper = _unwrap(self.accelerator.unwrap_model(model if model is not None else self.model))
        if self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model=wrapper.backbone)
        else:
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
    """What :func:`train` returns: where the model went, the Trainer's log history, final metrics."""

    output_dir: str
    log_history: list[dict]
    metrics: dict


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


def attention_implementation(requested: str | None = None) -> str:
    """``requested``, else flash_attention_2 when ``flash_attn`` is installed and CUDA is up, else sdpa."""
    if requested:
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model_and_tokenizer(name: str | None, attn_implementation: str | None = None):
    """``(model, tokenizer)`` for a hub name / local path; None or ``"sfr-tiny"`` = the embedded tiny LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfr.tiny_lm import resolve_model_name_or_path

    path = resolve_model_name_or_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention_implementation(attn_implementation))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"model: the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _head_embed_dim_in_checkpoint(checkpoint: str) -> int | None:
    config = Path(checkpoint) / HEAD_DIR / "config.json"
    if not config.is_file():
        return None
    return int(json.loads(config.read_text())["head"]["embed_dim"])


def _say(message: str) -> None:
    print(f"[sfr train] {message}", file=sys.stderr, flush=True)


def train(args: SFRTrainingArguments, model=None, data=None, tokenizer=None, callbacks=None) -> TrainResult:
    """Fine-tune with CE + SFR (or SFT / MTP) and save a plain transformers model plus ``sfr_head/``.

    Args:
        args: the arguments (``args.model`` / ``args.data`` are used when ``model`` / ``data`` are None).
        model: None (load ``args.model``), a causal LM (``PreTrainedModel``) or a ready :class:`SFRModel`.
        data: None (``args.data``, default: the embedded persona corpus), a path (raw chat data, prepared and
            cached with :func:`sfr.targets.prepare`, or a prepared directory) or a prepared ``datasets.Dataset``.
        tokenizer: the tokenizer when ``model`` is an object (default: loaded from ``args.model``).
        callbacks: extra ``TrainerCallback`` objects.

    Returns:
        :class:`TrainResult` with ``output_dir``, the Trainer's ``log_history`` and the final metrics.

    Every check that can fail (objective, checkpoint, model layout, target dimension) runs before the first
    training step.
    """
    if not isinstance(args, SFRTrainingArguments):
        raise TypeError(f"args must be SFRTrainingArguments, got {type(args).__name__}")
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)

    if model is None or isinstance(model, str):
        tokenizer_source = model if model is not None else args.model  # None = the embedded tiny LM
        backbone, loaded_tokenizer = load_model_and_tokenizer(tokenizer_source, args.attn_implementation)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        backbone = model.backbone if isinstance(model, SFRModel) else model
        tokenizer_source = args.model or getattr(backbone, "name_or_path", None) or None
        if tokenizer is None:
            from transformers import AutoTokenizer

            from sfr.tiny_lm import resolve_model_name_or_path

            tokenizer = AutoTokenizer.from_pretrained(resolve_model_name_or_path(tokenizer_source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    dataset, embed_dim = load_training_data(args, tokenizer_source, data)

    if isinstance(model, SFRModel):
        sfr_model = model
        if sfr_model.objective != args.objective:
            raise ValueError(f"objective {args.objective!r} differs from the given SFRModel's {sfr_model.objective!r}")
    else:
        sfr_model = SFRModel.from_backbone(
            backbone, embed_dim, objective=args.objective, sfr_config=args.sfr_config(_hidden_size(backbone), embed_dim),
            target_source=args.target_source, ema_decay=args.ema_decay, projection_seed=args.projection_seed,
            ce_backend=args.ce_backend, loss_backend=args.loss_backend)
    if sfr_model.head is not None:
        if embed_dim is None:
            raise ValueError(f"data: objective {args.objective!r} needs prepared targets (anchor_targets), found none")
        if sfr_model.head.embed_dim != embed_dim:
            raise ValueError(f"data: the prepared targets have E={embed_dim} but the flow head expects "
                             f"E={sfr_model.head.embed_dim} (prepare the data with the head's encoder)")
        saved_dim = _head_embed_dim_in_checkpoint(checkpoint) if checkpoint else None
        if saved_dim is not None and saved_dim != embed_dim:
            raise ValueError(f"resume_from_checkpoint: {checkpoint} holds a head with E={saved_dim}, "
                             f"the data has E={embed_dim}")

    from sfr.collator import SFRDataCollator

    collator = SFRDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length, embed_dim=embed_dim)
    extra = list(callbacks or [])
    if sfr_model.teacher is not None:
        extra.append(EMAUpdateCallback())
    trainer = SFRTrainer(model=sfr_model, args=args, train_dataset=dataset, data_collator=collator,
                         processing_class=tokenizer, callbacks=extra)
    device = args.device
    attn = getattr(backbone.config, "_attn_implementation", None) or "default"
    ce_path = "liger fused linear CE" if sfr_model._use_liger(torch.empty(0, device=device)) else "lm_head + CE"
    _say(f"objective={args.objective} target_source={args.target_source} device={device} attention={attn} "
         f"ce={ce_path} examples={len(dataset)}"
         + (f" head={sum(p.numel() for p in sfr_model.head.parameters()):,} params (E={embed_dim})"
            if sfr_model.head is not None else ""))
    if checkpoint:
        _say(f"resuming from {checkpoint}")

    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_training_state = False  # the final output: model + head, no teacher
    trainer.save_model(args.output_dir)
    metrics = dict(output.metrics)
    metrics["train_wall_s"] = round(time.perf_counter() - started, 2)
    last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
    for name in ("loss", "ce_loss", "sfr_loss", "sfr_lambda"):
        if name in last:
            metrics[f"final_{name}"] = last[name]
    if trainer.args.should_save:
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    return TrainResult(output_dir=str(args.output_dir), log_history=list(trainer.state.log_history), metrics=metrics)


def _hidden_size(backbone) -> int:
    from sfr.model import find_lm_head

    return int(find_lm_head(backbone).weight.shape[1])


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
        return load_from_disk(str(data)), int(meta["embed_dim"])
    prepared = targets.prepare(data, model=tokenizer_source, encoder=args.encoder,
                               segment_tokens=args.segment_tokens, anchor_stride=args.anchor_stride,
                               min_segment_tokens=args.min_segment_tokens, segment_mode=args.segment_mode,
                               max_length=args.max_length, progress=not args.disable_tqdm)
    return prepared.dataset, int(prepared.metadata["embed_dim"])


def _embed_dim_of(dataset) -> int | None:
    if "anchor_targets" not in dataset.column_names:
        return None
    for row in dataset:
        if row["anchor_targets"]:
            return len(row["anchor_targets"][0])
    return None
