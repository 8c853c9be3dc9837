"""``sfr train``: fine-tune a causal LM with CE + SFR (or plain SFT / MTP) from the command line.

Every field of :class:`sfr.training_args.SFRTrainingArguments` is a flag, in underscore and dash form
(``--max_steps`` / ``--max-steps``), as ``HfArgumentParser`` makes them. ``--config file.yaml`` reads
the same names as keys; flags on the command line override the file. With no ``--model`` the
embedded tiny LM is trained, and every setting the user leaves unset takes its value from
:data:`sfr.training_args.TINY_DEFAULTS` (a CPU run of about 20 seconds), with warm-up and phase lengths scaled to
``--max-steps`` (:func:`sfr.training_args.tiny_defaults`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

DEFAULT_OUTPUT_DIR = "sfr-output"
EPILOG = """\
examples:
  sfr train --output-dir runs/tiny                          # embedded tiny LM + persona corpus, CPU, ~20 s
  sfr train                                                 # the same, writing to ./sfr-output
  sfr train --output-dir runs/sft --objective sft           # the plain fine-tuning baseline
  sfr train --output-dir runs/q --model Qwen/Qwen2.5-0.5B-Instruct --data chats.jsonl \\
            --bf16 --per-device-train-batch-size 8 --max-steps 2000 --lambda-max 0.5
  sfr train --output-dir runs/q --resume-from-checkpoint latest   # continue a run (the same --output-dir)
  sfr train --config run.yaml --max-steps 10                # YAML keys = these argument names
  sfr train --output-dir runs/lora --lora-r 16 --merge-lora  # LoRA adapters (peft) + the full head
  torchrun --nproc-per-node 8 -m sfr train --fsdp full_shard --fsdp-config examples/distributed/fsdp2.json ...

phases: lambda = 0 for --phase-a-steps (the head learns alone), then a linear ramp to --lambda-max over
--ramp-steps. Output: a plain transformers model in OUTPUT_DIR (loads with from_pretrained), the flow head
in OUTPUT_DIR/sfr_head/, checkpoints OUTPUT_DIR/checkpoint-N/ (with the head, the EMA teacher, optimizer,
scheduler and RNG state, so --resume-from-checkpoint continues exactly).
"""


def _training_fields():
    from sfr.training_args import SFRTrainingArguments

    hints = typing.get_type_hints(SFRTrainingArguments)
    fields = [f for f in dataclasses.fields(SFRTrainingArguments) if f.init]
    return fields, hints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from transformers import HfArgumentParser

    parser.description = (
        "Fine-tune a causal LM with cross-entropy plus Semantic Flow Regularization (a flow-matching head on the "
        "final hidden state learns the distribution of the future text's sentence embedding), or plain SFT / the "
        "MTP preset with the same code path. Without --model/--data it trains the embedded tiny LM on the embedded "
        "persona corpus on the CPU in about 20 seconds; without --model, the embedded run's settings (listed at the "
        "end) replace the defaults shown for those options. Every TrainingArguments option is accepted as well. "
        "An --output-dir that holds a run is refused unless --resume-from-checkpoint or --overwrite-output-dir "
        "is given.")
    from sfr.training_args import SCALED_WITH_MAX_STEPS, TINY_DEFAULTS

    parser.epilog = EPILOG + ("\nwithout --model, unset options take the embedded run's values: "
                              + ", ".join(f"{k}={v}" for k, v in TINY_DEFAULTS.items())
                              + "; with another --max-steps, warmup_steps, phase_a_steps and ramp_steps keep "
                              "these proportions of it unless set\n")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = ("sfr train [--output-dir DIR] [--config FILE.yaml] [--model NAME_OR_PATH] [--data PATH] "
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
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    for action in parser._actions[before:]:
        if action.dest == "output_dir":
            action.help = f"where the model, sfr_head/ and checkpoints are written (default: ./{DEFAULT_OUTPUT_DIR})"
        elif action.dest in TINY_DEFAULTS and action.help and TINY_DEFAULTS[action.dest] != defaults[action.dest]:
            # The listed default applies with --model only: the embedded default run uses its own value.
            scaled = ", scaled with --max-steps" if action.dest in SCALED_WITH_MAX_STEPS else ""
            action.help += f" (default: {defaults[action.dest]}; without --model: {TINY_DEFAULTS[action.dest]}{scaled})"
        elif action.dest in defaults and action.help and "default" not in action.help.lower():
            action.help += f" (default: {defaults[action.dest]})"
        # Only flags given on the command line reach main(): they override the YAML file and the tiny defaults.
        action.default = argparse.SUPPRESS
        action.required = False


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
    try:
        content = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ValueError(f"--config {file}: not valid YAML: {problem}{where}") from None
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
    from sfr.training_args import SFRTrainingArguments, tiny_defaults

    values = dict(values)
    if not values.get("output_dir"):  # `sfr train` with no arguments at all trains the embedded default
        values["output_dir"] = DEFAULT_OUTPUT_DIR
    if values.get("model") in (None, DEFAULT_MODEL):
        values = {**tiny_defaults(values.get("max_steps")), **values}
    return SFRTrainingArguments(**values)


def _summary(result, wall_s: float) -> str:
    """A few lines for the end of a run: steps and time, the logged losses, where things went.

    The steps are those this run took (``global_step`` less the step it resumed from); the losses read "first -> last" when at least two
    steps were logged, else the one logged value (or the run's mean loss when nothing was logged).
    """
    metrics = result.metrics
    logged = [h for h in result.log_history if "loss" in h]
    training = f", training {metrics['train_wall_s']:.1f} s" if "train_wall_s" in metrics else ""
    steps = f"{result.steps_trained} step{'' if result.steps_trained == 1 else 's'}"
    if result.start_step:  # a resumed run: the steps it took, and where the model is now
        steps += f" (resumed at step {result.start_step}, now at {result.global_step})"
    lines = [f"sfr train: {steps} in {wall_s:.1f} s (loading and preparing data included{training})"]
    if logged:
        first, last = logged[0], logged[-1]
        names = [name for name in ("loss", "ce_loss", "sfr_loss") if name in first and name in last]
        if first.get("step") != last.get("step"):
            values = [f"{name} {first[name]:.4g} -> {last[name]:.4g}" for name in names]
            heading = f"logged (step {first.get('step')} -> {last.get('step')})"
        else:
            values = [f"{name} {last[name]:.4g}" for name in names]
            heading = f"logged (step {last.get('step')}, the only logged step)"
        if "sfr_lambda" in last:
            values.append(f"sfr_lambda {last['sfr_lambda']:.4g}")
        lines.append(f"  {heading}: {', '.join(values)}")
    elif "train_loss" in metrics:
        lines.append(f"  nothing logged (--logging-steps > steps); mean loss over the run: {metrics['train_loss']:.4g}")
    if (Path(result.output_dir) / "adapter_config.json").is_file():  # a LoRA run (sfr.lora)
        lines.append(f"  LoRA adapter: {result.output_dir} (peft.PeftModel.from_pretrained(base_model, ...))")
        if (Path(result.output_dir) / "merged").is_dir():
            lines.append(f"  merged model: {Path(result.output_dir) / 'merged'} (AutoModelForCausalLM.from_pretrained)")
    else:
        lines.append(f"  model: {result.output_dir} (AutoModelForCausalLM.from_pretrained)")
    from sfr.head import HEAD_DIR

    if (Path(result.output_dir) / HEAD_DIR).is_dir():
        lines.append(f"  flow head: {Path(result.output_dir) / HEAD_DIR} (sfr diagnose --model {result.output_dir})")
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

    from sfr.train import train

    started = time.perf_counter()
    try:
        result = train(training_args)
    except (ValueError, TypeError, OSError) as error:  # OSError: a model that does not load (sfr.loading)
        print(f"sfr train: error: {error}", file=sys.stderr)
        return 2
    print(_summary(result, time.perf_counter() - started))
    return 0
