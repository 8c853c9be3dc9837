"""``sfr train``: fine-tune a causal LM with CE + SFR (or plain SFT / MTP) from the command line.

Every field of :class:`sfr.trainer.SFRTrainingArguments` is a flag, in underscore and dash form
(``--max_steps`` / ``--max-steps``), as ``HfArgumentParser`` makes them. ``--config file.yaml`` reads
the same names as keys; flags on the command line override the file. With no ``--model`` the
embedded tiny LM is trained, and every setting the user leaves unset takes its value from
:data:`sfr.trainer.TINY_DEFAULTS` (a CPU run of a few minutes).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

EPILOG = """\
examples:
  sfr train --output-dir runs/tiny                          # embedded tiny LM + persona corpus, CPU, minutes
  sfr train --output-dir runs/sft --objective sft           # the plain fine-tuning baseline
  sfr train --output-dir runs/q --model Qwen/Qwen2.5-0.5B-Instruct --data chats.jsonl \\
            --bf16 --per-device-train-batch-size 8 --max-steps 2000 --lambda-max 0.5
  sfr train --output-dir runs/q --resume-from-checkpoint latest
  sfr train --config run.yaml --max-steps 10                # YAML keys = these argument names

phases: lambda = 0 for --phase-a-steps (the head learns alone), then a linear ramp to --lambda-max over
--ramp-steps. Output: a plain transformers model in OUTPUT_DIR (loads with from_pretrained), the flow head
in OUTPUT_DIR/sfr_head/, checkpoints OUTPUT_DIR/checkpoint-N/ (with head, optimizer and schedule state).
"""


def _training_fields():
    from sfr.trainer import SFRTrainingArguments

    hints = typing.get_type_hints(SFRTrainingArguments)
    fields = [f for f in dataclasses.fields(SFRTrainingArguments) if f.init]
    return fields, hints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from transformers import HfArgumentParser

    parser.description = (
        "Fine-tune a causal LM with cross-entropy plus Semantic Flow Regularization (a flow-matching head on the "
        "final hidden state learns the distribution of the future text's sentence embedding), or plain SFT / the "
        "MTP preset with the same code path. Without --model/--data it trains the embedded tiny LM on the embedded "
        "persona corpus on the CPU in a few minutes. Every TrainingArguments option is accepted as well.")
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = ("sfr train --output-dir DIR [--config FILE.yaml] [--model NAME_OR_PATH] [--data PATH] "
                    "[--objective {sfr,sft,mtp}] [--max-steps N] [--save-steps N] "
                    "[--resume-from-checkpoint PATH|latest] [SFR and TrainingArguments options]")
    from transformers import TrainingArguments

    sfr_group = parser.add_argument_group("SFR options")
    trainer_group = parser.add_argument_group("TrainingArguments options (transformers)")
    sfr_group.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
                           help="YAML file of argument values (keys = argument names); command-line flags win")
    before = len(parser._actions)
    base_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    fields, hints = _training_fields()
    for f in sorted(fields, key=lambda f: f.name in base_fields):  # SFR options first
        f.type = hints[f.name]  # the resolved annotation, as HfArgumentParser itself does
        group = trainer_group if f.name in base_fields and f.name != "output_dir" else sfr_group
        HfArgumentParser._parse_dataclass_field(group, f)
    for action in parser._actions[before:]:
        # Only flags given on the command line reach main(): they override the YAML file and the tiny defaults.
        action.default = argparse.SUPPRESS
        action.required = False
    for action in parser._actions[before:]:
        if action.dest == "output_dir":
            action.help = "where the model, sfr_head/ and checkpoints are written (required)"


def _coerce(key: str, value, annotation):
    """YAML scalars to the field's type (PyYAML reads ``1e-3`` as a string)."""
    if value is None or not isinstance(value, str):
        return value
    options = typing.get_args(annotation) or (annotation,)
    for kind in (int, float):
        if kind in options and str not in options:
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"config key {key!r}: expected {kind.__name__}, got {value!r}") from None
    return value


def read_config(path: str) -> dict:
    """YAML mapping of argument names (dash or underscore form) to values; unknown keys are an error."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config: file not found: {file}")
    content = yaml.safe_load(file.read_text()) or {}
    if not isinstance(content, dict):
        raise ValueError(f"--config {file}: expected a mapping of argument names to values, got {type(content).__name__}")
    fields, hints = _training_fields()
    known = {f.name for f in fields}
    values = {}
    for key, value in content.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"--config {file}: unknown key {key!r} (not an `sfr train` argument; see sfr train --help)")
        values[name] = _coerce(name, value, hints[name])
    return values


def build_arguments(values: dict):
    """:class:`SFRTrainingArguments` from explicit values, with the tiny-model defaults when no model is set."""
    from sfr.tiny_lm import DEFAULT_MODEL
    from sfr.trainer import TINY_DEFAULTS, SFRTrainingArguments

    values = dict(values)
    if not values.get("output_dir"):
        raise ValueError("--output-dir is required (where the model, sfr_head/ and checkpoints go)")
    if values.get("model") in (None, DEFAULT_MODEL):
        values = {**TINY_DEFAULTS, **values}
    return SFRTrainingArguments(**values)


def _summary(result, wall_s: float) -> str:
    metrics = result.metrics
    steps = next((h.get("step") for h in reversed(result.log_history) if "step" in h), None)
    lines = [f"sfr train: {steps} steps in {wall_s:.1f} s"]
    final = ", ".join(f"{k[len('final_'):]}={metrics[k]:.4g}" for k in
                      ("final_loss", "final_ce_loss", "final_sfr_loss", "final_sfr_lambda") if k in metrics)
    if final:
        lines.append(f"  last logged: {final}")
    lines.append(f"  model: {result.output_dir} (AutoModelForCausalLM.from_pretrained)")
    if (Path(result.output_dir) / "sfr_head").is_dir():
        lines.append(f"  flow head: {Path(result.output_dir) / 'sfr_head'} (sfr diagnose --model {result.output_dir})")
    return "\n".join(lines)


def main(args) -> int:
    import time

    fields, _ = _training_fields()
    known = {f.name for f in fields}
    explicit = {k: v for k, v in vars(args).items() if k in known}
    try:
        values = read_config(args.config) if getattr(args, "config", None) else {}
        values.update(explicit)
        training_args = build_arguments(values)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"sfr train: error: {error}", file=sys.stderr)
        return 2

    from sfr.trainer import train

    started = time.perf_counter()
    try:
        result = train(training_args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"sfr train: error: {error}", file=sys.stderr)
        return 2
    print(_summary(result, time.perf_counter() - started))
    return 0
