"""The ``sfr`` command line: a thin layer over the Python API.

Each subcommand lives in the module that owns its concern and exposes two functions:
``add_arguments(parser)`` and ``main(args) -> int``. Modules are imported only when their
subcommand runs, so ``sfr --help`` stays fast and a broken optional dependency of one command
never breaks the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from sfr import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("sfr.targets", "tokenise dialogue/code data and embed each anchor's future segment"),
    "train": ("sfr.train_cli", "fine-tune a causal LM with CE + SFR (or plain SFT / MTP)"),
    "eval": ("sfr.eval.cli", "evaluate models: dialogue diversity/style, code pass@k"),
    "diagnose": ("sfr.diagnostics", "Lock/Fork diagnostics: where do a model's futures branch?"),
    "demo": ("sfr.demo", "train SFT and SFR on the embedded default and compare them"),
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
    parser.command_parsers = {}  # name -> its parser, so that errors print the command's own usage
    for name, (module_name, help_text) in COMMANDS.items():
        cmd_parser = sub.add_parser(name, help=help_text, description=help_text)
        parser.command_parsers[name] = cmd_parser
        if name == command:  # import only the module of the command being run
            importlib.import_module(module_name).add_arguments(cmd_parser)
    return parser


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
        parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C is a user's decision, not a crash: no traceback
        print(f"sfr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
