"""``train()``: the Python API behind ``sfr train``.

Load (or take) a model and data, check every input before the first step (the cheap checks before
anything is loaded), build :class:`~sfr.trainer.SFRTrainer`, train, save the model and ``sfr_head/``,
and return a :class:`TrainResult`. The model comes from :func:`sfr.loading.load_model_and_tokenizer`;
raw data is prepared with :func:`sfr.targets.prepare`.
"""
from __future__ import annotations

import contextvars
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sfr.checks import check_output_dir
from sfr.encoder import check_encoder
from sfr.head import HEAD_CONFIG, HEAD_DIR
from sfr.loading import attention_implementation, check_model, load_model_and_tokenizer
from sfr.model import SFRModel, find_decoder, find_lm_head
from sfr.trainer import EMAUpdateCallback, SFRTrainer
from sfr.training_args import SFRTrainingArguments
from sfr_kernels import triton_runs_on


@dataclass
class TrainResult:
    """What :func:`train` returns: where the model went, the Trainer's log history, final metrics.

    ``metrics`` holds the Trainer's ``train_*`` metrics, ``train_wall_s`` and the last logged
    ``final_loss`` / ``final_ce_loss`` / ``final_sfr_loss`` / ``final_sfr_lambda``; ``global_step`` is
    the number of optimizer steps the model has had (those of a resumed run included), ``start_step``
    the step a resumed run started from.
    """

    output_dir: str
    log_history: list[dict]
    metrics: dict
    global_step: int = 0
    start_step: int = 0  # the checkpoint's step when the run resumed (0 for a new run)

    @property
    def steps_trained(self) -> int:
        """The optimizer steps this run took: ``global_step - start_step``."""
        return self.global_step - self.start_step


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


_QUIET = contextvars.ContextVar("sfr_train_quiet", default=False)  # train(quiet=True) while it runs


def _say(message: str) -> None:
    if not _QUIET.get():
        print(f"[sfr train] {message}", file=sys.stderr, flush=True)


def train(args: SFRTrainingArguments, model=None, data=None, tokenizer=None, callbacks=None, *,
          quiet: bool = False) -> TrainResult:
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
        quiet: print no stage messages and no per-step log lines (the Trainer prints its logs when its
            progress bar is off; warnings still show).

    Returns:
        :class:`TrainResult` with ``output_dir``, the Trainer's ``log_history`` and the final metrics.

    Every check that can fail (arguments, output directory, checkpoint, model layout, tokenizer, token
    ids, target dimension) runs before the first training step, the cheap ones before any model is
    loaded or data is prepared. An ``output_dir`` that holds a previous run is refused unless the run
    resumes (``resume_from_checkpoint``) or replaces it (``overwrite_output_dir``). A run that fails
    removes the output directory again when it created it and wrote nothing there.
    """
    quiet_token = _QUIET.set(quiet)
    try:
        return _checked_train(args, model, data, tokenizer, callbacks)
    finally:
        _QUIET.reset(quiet_token)


def _checked_train(args: SFRTrainingArguments, model, data, tokenizer, callbacks) -> TrainResult:
    """:func:`train` within its ``quiet`` setting: the cheap checks, then the run (:func:`_train`); a
    failed run removes the output directory it created when it wrote nothing there."""
    if not isinstance(args, SFRTrainingArguments):
        raise TypeError(f"args must be SFRTrainingArguments, got {type(args).__name__}")
    output_dir = check_output_dir(args.output_dir)
    _check_loss_backend(args, model)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is None:
        _check_previous_run(output_dir, args.overwrite_output_dir)
    else:
        _check_steps_left(checkpoint, args.max_steps)
    # A model or encoder that cannot load: one line in seconds, not after the hub's retries or the data.
    check_model(args.model if model is None else model, "--model")
    if args.encoder is not None:
        check_encoder(args.encoder, "--encoder")
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
        backbone, loaded_tokenizer = load_model_and_tokenizer(model_name, attn_implementation=attn)
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
        if args.lora_r is not None:
            from sfr.lora import apply_lora

            torch.manual_seed(args.seed)  # the adapters' random init (lora_A), as the head's below
            backbone = apply_lora(backbone, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
            trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
            _say(f"lora: r={args.lora_r} alpha={args.lora_alpha or 2 * args.lora_r:g} "
                 f"targets={args.lora_target_modules}: {trainable:,} adapter parameters train, "
                 f"{sum(p.numel() for p in backbone.parameters()) - trainable:,} backbone weights are frozen")
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
    trainer.run_record.say = _say  # its lines (which loss path, on what) are this run's, silenced by quiet
    if _QUIET.get():  # with its progress bar off, the Trainer prints every log as a dict
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
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
    if args.merge_lora and trainer.args.should_save:
        from sfr.lora import merge_saved_adapter

        _say(f"--merge-lora: merged model in {merge_saved_adapter(args.output_dir)}")
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
                       global_step=int(trainer.state.global_step),
                       start_step=_checkpoint_step(checkpoint) if checkpoint else 0)


# Files that a run (or a trainer.save_model) leaves in its output directory.
_RUN_FILES = ("trainer_state.json", TRAINING_ARGS_NAME, "model.safetensors", "model.safetensors.index.json", HEAD_DIR,
              "adapter_config.json")


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
    step = _checkpoint_step(checkpoint)
    if max_steps <= 0 or step is None:
        return
    if step >= max_steps:
        raise ValueError(f"resume_from_checkpoint: {checkpoint} is at step {step} >= --max-steps {max_steps}: "
                         f"nothing left to train (raise --max-steps to continue the run)")


def _checkpoint_step(checkpoint: str) -> int | None:
    """The ``global_step`` of a checkpoint's ``trainer_state.json``; None when it does not read (the
    Trainer reports that)."""
    try:
        return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step", 0))
    except (OSError, ValueError, TypeError):
        return None


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
        what = (f"{longer} of {len(dataset)} examples are longer than {limit} tokens and are truncated to it "
                "(anchors past it are dropped)")
        if args.max_length:  # asked for
            _say(f"--max-length: {what}")
        else:
            warnings.warn(f"the model's context (max_position_embeddings={limit}): {what}", UserWarning, stacklevel=2)
    return limit


def _head_embed_dim_in_checkpoint(checkpoint: str) -> int | None:
    config = Path(checkpoint) / HEAD_DIR / HEAD_CONFIG
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
            warnings.warn(f"{data} was prepared with the tokenizer {meta['tokenizer']!r}, the model's is "
                          f"{resolve_model_name_or_path(tokenizer_source)!r}: make sure they are the same",
                          UserWarning, stacklevel=2)
        return load_from_disk(str(data)), int(meta["embed_dim"])
    prepared = targets.prepare(data, model=tokenizer_source, encoder=args.encoder,
                               segment_tokens=args.segment_tokens, anchor_stride=args.anchor_stride,
                               min_segment_tokens=args.min_segment_tokens, segment_mode=args.segment_mode,
                               max_length=args.max_length, progress=not args.disable_tqdm)
    _say(f"prepared targets {'from the cache' if prepared.cache_hit else 'cached'} at {prepared.path} "
         f"({'embedded corpus' if data is None else data}; --data {prepared.path} uses them directly)")
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
