"""TRL users: :class:`SFRSFTTrainer`, ``trl.SFTTrainer`` plus the SFR objective.

A drop-in: the same arguments, data formats and model handling as ``SFTTrainer`` (a model id, path or
object, ``peft_config`` for LoRA, conversational ``messages`` or ``prompt``/``completion`` data, the
chat template, ``max_length`` truncation, ``completion_only_loss`` / ``assistant_only_loss``), and the
config may stay a plain ``trl.SFTConfig`` (SFR's defaults then apply) or become :class:`SFRSFTConfig`,
``SFTConfig`` plus SFR's settings (:class:`sfr.training_args.SFRArguments`: ``lambda_max``, the phases,
the head, the encoder and segments)::

    from sfr.integrations.trl import SFRSFTConfig, SFRSFTTrainer

    trainer = SFRSFTTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", train_dataset=dataset,
                            args=SFRSFTConfig(output_dir="out", lambda_max=0.5, phase_a_steps=100))
    trainer.train()
    trainer.save_model()        # the model (or the LoRA adapter) and out/sfr_head/

What it adds: after TRL has tokenised the data into ``input_ids`` and ``labels`` (its rules decide
which tokens train), every labelled span gets its anchors and future segments (docs/design.md,
"Anchors"), embedded by the frozen sentence encoder (:func:`add_targets`); the model becomes an
:class:`~sfr.model.SFRModel` (the causal LM + the flow head), and training is
:class:`~sfr.trainer.SFRTrainer`'s: the lambda schedule, per-step seeds, exact loss scaling, separate
clipping, ``ce_loss``/``sfr_loss``/``sfr_lambda`` logs, ``sfr_head/`` and ``sfr_run.json``. Not
supported (a clear error): ``packing`` and ``padding_free`` (anchors index padded rows), a custom
``data_collator``, ``target_source="ema"``. TRL's token-accuracy and entropy metrics are not logged
(the model never forms the logits' softmax for them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from trl import SFTConfig, SFTTrainer

from sfr.collator import SFRDataCollator
from sfr.encoder import encode_texts, load_encoder
from sfr.model import SFRModel
from sfr.targets import segment_example
from sfr.trainer import SFRTrainer
from sfr.training_args import SFRArguments


@dataclass
class SFRSFTConfig(SFRArguments, SFTConfig):
    """``trl.SFTConfig`` plus SFR's settings (:class:`~sfr.training_args.SFRArguments`)."""

    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the anchor columns for the collator"})

    def __post_init__(self):
        self.check_sfr_arguments()
        super().__post_init__()


def as_sfr_config(args: SFTConfig | None, model) -> SFRSFTConfig:
    """``args`` as an :class:`SFRSFTConfig`: itself, the same values with SFR's defaults added to a plain
    ``SFTConfig``, or (None) ``SFTTrainer``'s default config for ``model``."""
    if isinstance(args, SFRSFTConfig):
        return args
    if args is None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
        return SFRSFTConfig(output_dir=f"{str(name).split('/')[-1]}-SFR")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    values["remove_unused_columns"] = False  # the collator needs the anchor columns
    return SFRSFTConfig(**values)


def add_targets(dataset, tokenizer, encoder, args: SFRArguments, progress: bool = True):
    """``(dataset with anchor_positions, anchor_segment_ends, anchor_targets; E)`` for rows of TRL's
    tokenised ``input_ids`` and ``labels``: the anchors of every labelled span and the normalised encoder
    embeddings of their segments (:func:`sfr.targets.segment_example`; identical texts encoded once)."""
    positions, ends, texts = [], [], []
    token_texts: dict = {}
    for row in dataset.select_columns(["input_ids", "labels"]):
        segments = segment_example(row["input_ids"], row["labels"], tokenizer, args.segment_tokens,
                                   args.anchor_stride, args.min_segment_tokens, args.segment_mode, token_texts)
        positions.append([s.position for s in segments])
        ends.append([s.end for s in segments])
        texts.append([s.text for s in segments])
    unique = list(dict.fromkeys(text for row in texts for text in row))
    embeddings = encode_texts(encoder, unique, progress=progress)
    embed_dim = int(embeddings.shape[1])
    row_of = {text: i for i, text in enumerate(unique)}
    targets = [embeddings[[row_of[t] for t in row]].reshape(len(row), embed_dim).tolist() for row in texts]
    for name, column in (("anchor_positions", positions), ("anchor_segment_ends", ends), ("anchor_targets", targets)):
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, column)
    return dataset, embed_dim


class SFRSFTTrainer(SFRTrainer, SFTTrainer):
    """``trl.SFTTrainer`` with the SFR objective (see the module doc). Same arguments as ``SFTTrainer``."""

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, callbacks=None, optimizers=(None, None),
                 peft_config=None, formatting_func=None, **kwargs):
        args = as_sfr_config(args, model)
        for problem, present in (("packing", args.packing), ("padding_free", args.padding_free),
                                 ("a data_collator (the SFR collator builds the anchors)", data_collator is not None),
                                 ("target_source='ema'", args.target_source == "ema")):
            if present:
                raise ValueError(f"SFRSFTTrainer does not support {problem}")
        SFTTrainer.__init__(self, model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                            peft_config=peft_config, formatting_func=formatting_func, **kwargs)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        encoder = load_encoder(args.encoder)
        progress = not args.disable_tqdm
        self.train_dataset, embed_dim = add_targets(self.train_dataset, tokenizer, encoder, args, progress)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: add_targets(v, tokenizer, encoder, args, progress)[0]
                                 for k, v in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = add_targets(self.eval_dataset, tokenizer, encoder, args, progress)[0]
        backbone = self.model
        hidden_size = backbone.get_output_embeddings().weight.shape[1]
        torch.manual_seed(args.seed)  # the head's init, as sfr train seeds it
        sfr_model = SFRModel.from_backbone(backbone, embed_dim if args.objective != "sft" else None,
                                           objective=args.objective, sfr_config=args.sfr_config(hidden_size, embed_dim),
                                           ce_backend=args.ce_backend, loss_backend=args.loss_backend)
        self.model = self.model_wrapped = self.callback_handler.model = sfr_model
        self.data_collator = SFRDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                                             embed_dim=embed_dim)
        self._init_sfr()
