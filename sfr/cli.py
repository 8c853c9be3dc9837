"""The ``sfr`` command line: a thin layer over the Python API.

Each subcommand is a module of :mod:`sfr.commands` that exposes two functions:
``add_arguments(parser)`` and ``main(args) -> int``, over the Python API of its library module.
Modules are imported only when their subcommand runs, so ``sfr --help`` stays fast and a broken
optional dependency of one command never breaks the others.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from sfr import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("sfr.commands.prepare", "tokenise dialogue/code data and embed each anchor's future segment"),
    "train": ("sfr.commands.train", "fine-tune a causal LM with CE + SFR (or plain SFT / MTP)"),
    "eval": ("sfr.commands.eval", "evaluate models: dialogue diversity/style, code pass@k"),
    "diagnose": ("sfr.commands.diagnose", "Lock/Fork diagnostics: where do a model's futures branch?"),
    "demo": ("sfr.commands.demo", "train SFT and SFR on the embedded default and compare them"),
    "study": ("sfr.commands.study", "Cross-Style Collapse: SFT vs SFR vs MTP across training seeds, with intervals"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfr",
        description=(
            "Semantic Flow Regularization for LLM fine-tuning. A small flow-matching head learns the "
            "distribution of a sentence encoder's embedding of the future text from the LM's hidden "
            "state, which keeps fine-tuned models diverse. Run 'sfr COMMAND --help' for a command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"sfr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # name -> its parser, so that errors print the (sub)command's own usage (see _innermost_parser)
    parser.command_parsers, parser.command_dest = {}, "command"
    for name, (module_name, help_text) in COMMANDS.items():
        cmd_parser = sub.add_parser(name, help=help_text, description=help_text)
        parser.command_parsers[name] = cmd_parser
        if name == command:  # import only the module of the command being run
            importlib.import_module(module_name).add_arguments(cmd_parser)
    return parser


def _innermost_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the (sub)command being run. A parser with subcommands names them in its
    ``command_parsers`` and the ``args`` attribute that holds the choice in ``command_dest``."""
    while getattr(parser, "command_parsers", None):
        chosen = parser.command_parsers.get(getattr(args, parser.command_dest, None))
        if chosen is None:
            break
        parser = chosen
    return parser


def _one_line_warnings(prefix: str):
    """A ``warnings.showwarning`` that prints every warning as one line on its own, ``PREFIX: warning:
    message``, without the source location and code line a command-line user cannot act on.

    The line goes through ``tqdm.write``, which lifts any progress bar out of the way and redraws it
    below, so a warning never ends up glued to a bar. A message that already starts with the prefix
    does not repeat it; a warning of another library than sfr names its category (``[FutureWarning]``).
    """
    from tqdm import tqdm

    package_dir = os.path.dirname(os.path.abspath(__file__))

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split()).removeprefix(f"{prefix}: ")
        ours = os.path.abspath(filename).startswith(package_dir + os.sep)
        if not ours and category is not UserWarning:
            text += f" [{category.__name__}]"
        tqdm.write(f"{prefix}: warning: {text}", file=sys.stderr)

    return show


def _drop_deepspeed_cpu_notice(record) -> bool:
    """A filter for DeepSpeed's logger: False for the line it logs when it finds no accelerator. With
    DeepSpeed installed, importing the Trainer stack prints it on every CPU run, --quiet or not."""
    return "Setting accelerator to CPU" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 0
    if unknown:  # argparse would print the top-level usage; the command's own is the helpful one
        _innermost_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "quiet", False):  # before anything imports DeepSpeed: its logger keeps the filter
        import logging

        logging.getLogger("DeepSpeed").addFilter(_drop_deepspeed_cpu_notice)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning afterwards
            warnings.showwarning = _one_line_warnings(f"sfr {args.command}")
            return int(module.main(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C is a user's decision, not a crash: no traceback
        print(f"sfr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
