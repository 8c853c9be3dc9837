"""``OUTPUT_DIR/sfr_run.json``: which SFR loss path a training run took, on which distributed set-up.

Written by :class:`RunRecordCallback` (used by :class:`sfr.trainer.SFRTrainer` and
:class:`sfr.integrations.trl.SFRSFTTrainer`) when training starts, from the model as the engine has
wrapped it, and again after the first optimizer step with the path the loss actually took
(``"observed": true``). The same facts are the first lines the run logs. Fields::

    sfr_loss_backend   "triton" (fused kernels) | "torch" (PyTorch reference) | null (objective sft: no SFR loss)
    fallback_reason    null, or why the reference runs where the kernels were asked for
    loss_backend       what was asked for: "auto" | "triton" | "torch"
    distributed        "none" | "ddp" | "fsdp" | "deepspeed"   (+ fsdp_version / zero_stage)
    world_size         number of processes
    device, objective, target_source, sfr_config (the resolved SFRConfig), lambda_schedule,
    sfr_version, torch_version, triton_version, transformers_version, observed
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

RUN_FILE = "sfr_run.json"
DISTRIBUTED_KINDS = ("none", "ddp", "fsdp", "deepspeed")


def unwrap_model(model):
    """The module inside DDP/FSDP1/DeepSpeed wrappers (each keeps it as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def distributed_setup(accelerator) -> dict:
    """``{"distributed": kind, "world_size": n}`` (+ ``fsdp_version`` or ``zero_stage``) of an ``Accelerator``."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    setup = {"world_size": int(accelerator.num_processes)}
    if kind == DistributedType.FSDP:
        setup["distributed"] = "fsdp"
        setup["fsdp_version"] = int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) or 1)
    elif kind == DistributedType.DEEPSPEED:
        setup["distributed"] = "deepspeed"
        setup["zero_stage"] = int(accelerator.state.deepspeed_plugin.zero_stage)
    elif kind == DistributedType.NO or accelerator.num_processes == 1:
        setup["distributed"] = "none"
    else:  # MULTI_GPU, MULTI_CPU, MULTI_XPU, ...: the Trainer wraps the model in DDP
        setup["distributed"] = "ddp"
    return setup


def _versions() -> dict:
    import transformers

    import sfr

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"sfr_version": sfr.__version__, "torch_version": torch.__version__, "triton_version": triton_version,
            "transformers_version": transformers.__version__}


def run_record(model, args, accelerator, schedule: dict | None = None) -> dict:
    """The record of a run about to train ``model`` (an :class:`~sfr.model.SFRModel`, wrapped or not).

    The loss path is :meth:`SFRModel.sfr_loss_path` on the head as the engine holds it now (sharded
    or hooked), for states on ``args.device``; after a step, :meth:`observe` replaces it by the
    model's ``loss_path`` (what the last forward actually took).
    """
    sfr_model = unwrap_model(model)
    record = {"sfr_loss_backend": None, "fallback_reason": None,
              "loss_backend": getattr(sfr_model, "loss_backend", None)}
    if sfr_model.head is not None:
        path = sfr_model.sfr_loss_path(torch.empty(0, sfr_model.hidden_size, device=args.device))
        record.update(sfr_loss_backend=path.backend, fallback_reason=path.fallback_reason)
    record.update(distributed_setup(accelerator))
    record.update(device=str(args.device), objective=sfr_model.objective, target_source=sfr_model.target_source,
                  sfr_config=sfr_model.sfr_config.to_dict() if sfr_model.sfr_config is not None else None,
                  lambda_schedule=dict(schedule or {}), **_versions(), observed=False)
    return record


def describe(record: dict) -> list[str]:
    """The log lines that say what ``record`` says."""
    backend = record["sfr_loss_backend"]
    if backend is None:
        loss = "sfr_loss: none (objective sft)"
    elif backend == "triton":
        loss = "sfr_loss: triton (fused kernels)"
    else:
        loss = "sfr_loss: torch (PyTorch reference)" + (
            f", falling back: {record['fallback_reason']}" if record["fallback_reason"] else "")
    setup = record["distributed"] + (f" (FSDP{record['fsdp_version']})" if "fsdp_version" in record else "") + (
        f" (ZeRO-{record['zero_stage']})" if "zero_stage" in record else "")
    return [f"{loss} | distributed: {setup}, world_size {record['world_size']}",
            f"sfr {record['sfr_version']}, torch {record['torch_version']}, triton {record['triton_version']}, "
            f"transformers {record['transformers_version']}"]


def write_record(record: dict, output_dir: str | os.PathLike) -> Path:
    """Write ``output_dir/sfr_run.json`` (through a temporary file, so a reader never sees half of it)."""
    path = Path(output_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{RUN_FILE}.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(path)
    return path


class RunRecordCallback(TrainerCallback):
    """Says and writes :data:`RUN_FILE` when training starts, and again with the observed path after the first step.

    ``trainer`` gives the accelerator (the distributed set-up) and the model as the engine wrapped it;
    ``schedule`` is the lambda schedule to record (``phase_a_steps``, ``ramp_steps``, ``lambda_max``).
    """

    def __init__(self, trainer, schedule: dict | None = None, say=None):
        self.trainer = trainer
        self.schedule = schedule
        self.say = say or (lambda line: print(f"[sfr] {line}", file=sys.stderr, flush=True))
        self.record: dict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record = run_record(model if model is not None else self.trainer.model, args,
                                 self.trainer.accelerator, self.schedule)
        if state.is_world_process_zero:
            for line in describe(self.record):
                self.say(line)
            if args.should_save:
                self.say(f"run record: {write_record(self.record, args.output_dir)}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.record is None or self.record["observed"]:
            return
        sfr_model = unwrap_model(model if model is not None else self.trainer.model)
        path = getattr(sfr_model, "loss_path", None)
        observed = dict(self.record, observed=True)
        if path is not None:
            observed.update(sfr_loss_backend=path.backend, fallback_reason=path.fallback_reason)
        if (observed["sfr_loss_backend"], observed["fallback_reason"]) != (
                self.record["sfr_loss_backend"], self.record["fallback_reason"]) and state.is_world_process_zero:
            warnings.warn(f"sfr: the SFR loss took another path than announced at the start: "
                          f"{describe(observed)[0]}", stacklevel=1)
        self.record = observed
        if state.is_world_process_zero and args.should_save:
            write_record(observed, args.output_dir)
