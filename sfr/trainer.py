"""``SFRTrainer``: Hugging Face ``Trainer`` for CE + SFR, and its callbacks.

``SFRTrainer`` adds to ``transformers.Trainer``:

* loss scaling: the summed CE is divided by the labelled-token count and the summed SFR loss by the
  anchor count (or anchor-weight sum) of the whole accumulated, all-device batch, so ``k``
  accumulated micro-batches give the gradients of one batch ``k`` times larger;
* the lambda schedule and the per-micro-batch Philox seeds, both pure functions of
  ``(seed, global_step, micro_step)`` (:mod:`sfr.schedule`), hence resume-safe; each rank passes the
  anchors of the ranks before it as the loss's ``anchor_offset``, so N processes draw exactly what one
  process draws for the same global batch;
* gradient clipping of the backbone and the head separately, so that in phase A the backbone's
  update is exactly SFT's;
* ``ce_loss``, ``sfr_loss`` and ``sfr_lambda`` in the logs (averaged over ranks and logging steps);
* ``OUTPUT_DIR/sfr_run.json``: which SFR loss path ran, on which distributed set-up (:mod:`sfr.run_record`);
* saving: a checkpoint or the final output holds the backbone as a plain transformers model
  (``save_pretrained``) and the head in ``sfr_head/``; checkpoints also hold the EMA teacher in
  ``sfr_teacher/`` next to the optimizer, scheduler and RNG state, and resuming restores all of them.

Its arguments are :class:`sfr.training_args.SFRTrainingArguments`; :func:`sfr.train.train` (the Python
API behind ``sfr train``) loads the model and data, checks every input and runs it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME

from sfr.data import IGNORE_INDEX
from sfr.distributed import clip_grad_norm, enable_fsdp_on_cpu, fsdp1_cpu_state_dict
from sfr.head import HEAD_DIR, HEAD_WEIGHTS
from sfr.lora import is_peft_model, load_adapter_weights
from sfr.model import SFRModel
from sfr.run_record import RunRecordCallback, unwrap_model
from sfr.schedule import device_seed
from sfr.training_args import SFRArguments

TEACHER_DIR = "sfr_teacher"
TEACHER_WEIGHTS = "model.safetensors"


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
        message = f"{what}; shorten --phase-a-steps / --ramp-steps for a run this short"
        # Shown once, attributed to this line: a higher stacklevel would name transformers' callback handler.
        warnings.warn(message, UserWarning, stacklevel=1)


class EMAUpdateCallback(TrainerCallback):
    """After every optimizer step: ``teacher <- decay teacher + (1 - decay) student``."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = unwrap_model(model)
        if isinstance(model, SFRModel) and model.teacher is not None:
            model.teacher.update(model.decoder)


class SFRTrainer(Trainer):
    """``Trainer`` for an :class:`~sfr.model.SFRModel` and :class:`SFRTrainingArguments` (any
    :class:`~sfr.training_args.SFRArguments`: TRL's is :class:`sfr.integrations.trl.SFRSFTTrainer`)."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated-batch counts itself

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_sfr()

    def _init_sfr(self) -> None:
        """Check the model and arguments, add the SFR callbacks (after ``Trainer.__init__``)."""
        if not isinstance(unwrap_model(self.model), SFRModel):
            raise TypeError(f"model must be an sfr.model.SFRModel, got {type(self.model).__name__}")
        if not isinstance(self.args, SFRArguments):
            raise TypeError(f"args must be SFRTrainingArguments (or another SFRArguments), got {type(self.args).__name__}")
        if self.args.n_gpu > 1:
            raise ValueError("SFRTrainer does not support torch.nn.DataParallel (several GPUs in one process): "
                             "launch with torchrun or accelerate launch (DDP/FSDP/DeepSpeed), one process per GPU")
        if self.args.load_best_model_at_end:
            raise ValueError("load_best_model_at_end is not supported by SFRTrainer")
        if self.args.label_smoothing_factor or self.compute_loss_func is not None:
            raise ValueError("SFRTrainer computes CE + SFR inside SFRModel.forward: label_smoothing_factor and "
                             "compute_loss_func are not supported")
        self.add_callback(PhaseCheckCallback)
        schedule = {name: getattr(self.args, name) for name in ("phase_a_steps", "ramp_steps", "lambda_max")}
        self.run_record = RunRecordCallback(self, schedule)  # OUTPUT_DIR/sfr_run.json and the first log lines
        self.add_callback(self.run_record)
        self.model_accepts_loss_kwargs = True
        self._num_anchors_in_batch = None
        self._anchor_offsets = None  # per micro-batch of this step, in a multi-process run
        self._micro_step = 0
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_steps = 0
        self._last_lambda = 0.0

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator, with FSDP also on a multi-process CPU run (:mod:`sfr.distributed`)."""
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)

    # ---- counts of the accumulated batch -------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The micro-batches of one optimizer step, and the token count that CE is divided by.

        Also stores the anchor count (or anchor-weight sum) that SFR is divided by. Both are summed
        over the micro-batches and all ranks, then divided by the number of processes: DDP averages
        gradients over ranks, so a rank's summed loss divided by ``count / world`` gives exactly the
        gradient of the all-device mean. (This replaces the Trainer's own token count, which depends on
        ``average_tokens_across_devices``; here the division is always by the all-device count.)

        The same collective gives every micro-batch's anchor offset: the number of its anchors on the
        ranks before this one, so that N ranks draw exactly the source and time draws of one process
        over the same global batch (``sfr_loss``'s ``anchor_offset``; :meth:`compute_loss`).
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        self._micro_step = 0
        self._metric_steps += 1
        if not batch_samples:
            self._num_anchors_in_batch = None
            return batch_samples, None
        # [tokens, anchors (or weight sum), anchors of micro-batch 0, 1, ...]; float32 counts are exact to 2**24.
        # One slot per possible micro-batch, so every rank gathers the same shape even if its step is short.
        slots = max(len(batch_samples), self.args.gradient_accumulation_steps)
        counts = torch.zeros(2 + slots, dtype=torch.float32, device=self.args.device)
        for k, batch in enumerate(batch_samples):
            counts[0] += batch["labels"][..., 1:].ne(IGNORE_INDEX).sum().to(counts.device)
            anchors = batch["anchor_index"].shape[0] if batch.get("anchor_index") is not None else 0
            counts[2 + k] = anchors
            if batch.get("anchor_weight") is not None:
                counts[1] += batch["anchor_weight"].sum().to(device=counts.device, dtype=torch.float32)
            else:
                counts[1] += anchors
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        self._anchor_offsets = None
        if world > 1:
            per_rank = self.accelerator.gather(counts.reshape(1, -1))  # [world, 2 + slots]: one collective
            self._anchor_offsets = per_rank[:rank, 2:].sum(0).to(torch.int64)  # anchors on the ranks before
            counts = per_rank.sum(0)
        counts = counts / world
        self._num_anchors_in_batch = counts[1]
        return batch_samples, counts[0]

    # ---- gradient clipping -------------------------------------------------------------------------
    def _clip_grad_norm(self, model):
        """Clip the backbone's and the head's gradients separately; return the backbone's pre-clip norm.

        A global norm would let the head's gradient change the backbone's clipping factor, so even at
        lambda = 0 the backbone's update would differ from SFT's. Under FSDP the groups' norms are
        reduced over the ranks (:func:`sfr.distributed.clip_grad_norm`). Where the groups cannot be
        told apart the global clipping is kept: DeepSpeed clips inside its engine (``gradient_clipping``),
        and FSDP1 without ``use_orig_params`` keeps the root's weights in a flat parameter of its own.
        """
        from accelerate.utils import DistributedType

        wrapper = unwrap_model(self.accelerator.unwrap_model(model))
        kind = self.accelerator.distributed_type
        fsdp1 = kind == DistributedType.FSDP and not self.accelerator.is_fsdp2
        if (kind == DistributedType.DEEPSPEED or (fsdp1 and not self.accelerator.state.fsdp_plugin.use_orig_params)
                or wrapper.head is None or not hasattr(self.accelerator, "unscale_gradients")):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # once: fp16 loss scaling must be undone before clipping
        max_norm = self.args.max_grad_norm
        backbone_norm = clip_grad_norm(list(wrapper.backbone.parameters()), max_norm, sharded=fsdp1)
        clip_grad_norm(list(wrapper.head.parameters()), max_norm, sharded=fsdp1)
        return backbone_norm

    # ---- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One micro-batch's ``L_CE + L_SFR`` at ``lambda = lambda_at(global_step)``.

        The Philox seed is ``step_seed(seed, global_step, micro_step)`` (:mod:`sfr.schedule`), a 0-dim
        int64 tensor made on the device, the same on every rank: in training each rank passes its anchor
        offset (:meth:`get_batch_samples`), so N ranks draw what one process draws for the same global
        batch. (Evaluation batches have no offsets: there the seed also hashes the rank.) In training the
        losses are divided by the counts of the accumulated, all-device batch; in evaluation by this batch's.
        """
        step = int(self.state.global_step)
        lam = self.args.lambda_at(step)
        training = model.training
        micro = self._micro_step if training else 0
        offsets = self._anchor_offsets if training else None  # one slot per micro-batch of the step
        rank = 0 if offsets is not None else self.args.process_index
        seed = device_seed(self.args.seed, step, micro, rank, device=self.args.device)
        extra = {}
        if training and num_items_in_batch is not None:
            extra = dict(num_items_in_batch=num_items_in_batch, num_anchors_in_batch=self._num_anchors_in_batch)
        if offsets is not None:
            extra["sfr_anchor_offset"] = offsets[micro]
        outputs = model(**inputs, sfr_lambda=lam, sfr_seed=seed, **extra)
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
            if isinstance(unwrap_model(self.model), SFRModel) and unwrap_model(self.model).head is not None:
                logs["sfr_lambda"] = round(self._last_lambda, 6)
            self._metric_sums = {}
            self._metric_steps = 0
        super().log(logs, *args, **kwargs)

    # ---- saving and loading -----------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's ``save_model``; FSDP1 on the CPU gathers the weights itself (:mod:`sfr.distributed`)."""
        state_dict = fsdp1_cpu_state_dict(self)
        if state_dict is None:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The backbone via ``save_pretrained`` (a plain transformers model, no head keys), the head to ``sfr_head/``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        unwrap_model(self.accelerator.unwrap_model(self.model)).save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Checkpoints only: the Trainer's optimizer/scheduler state plus the EMA teacher (``sfr_teacher/``).

        The teacher is training state, like the optimizer: the final model does not need it. FSDP and
        DeepSpeed save the whole module (teacher included) in their own checkpoint files.
        """
        super()._save_optimizer_and_scheduler(output_dir)
        model = unwrap_model(self.accelerator.unwrap_model(self.model))
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
        wrapper = unwrap_model(self.accelerator.unwrap_model(model if model is not None else self.model))
        if is_peft_model(wrapper.backbone):
            load_adapter_weights(wrapper.backbone, resume_from_checkpoint)
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
