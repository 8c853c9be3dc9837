"""``sfr demo``: SFT vs SFR on the embedded default (:func:`sfr.demo.run_demo`)."""
from __future__ import annotations

import argparse
import os
import sys

from sfr.checks import check_output_dir
from sfr.demo import FULL, QUICK, demo_settings, run_demo

EPILOG = f"""\
default budget: {FULL.max_steps} steps per model, {FULL.samples} samples per prompt, all 18 eval prompts
(measured: about 2 minutes on an idle 2-core CPU, 9 minutes with the 2 cores shared). --quick: {QUICK.max_steps} steps, {QUICK.samples} samples, {QUICK.limit} prompts
(well under a minute once the tiny model and the corpus targets are cached; a smoke test).

examples:
  sfr demo                                  # the full comparison, report in ./sfr-demo/report.md
  sfr demo --quick --output-dir demo-quick  # the CI smoke test
  sfr demo --max-steps 1500 --samples 64    # a bigger budget
  sfr demo --seed 1 --output-dir sfr-demo-seed1   # another training seed: how much do the numbers move?
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train the embedded tiny LM on the embedded persona corpus twice, with plain fine-tuning (SFT) and with "
        "SFR, using the same budget and seed; sample replies to held-out persona x question pairs from both; "
        "report diversity (distinct-n, self-BLEU, embedding diversity), style (persona classifier, style markers, "
        "mode coverage/entropy vs the corpus' known frequencies) and quality proxies (held-out NLL, valid-reply "
        "rate), with bootstrap intervals for SFR - SFT. Writes OUTPUT/report.md, results.json, samples.json and "
        "PNG plots (diversity, style, quality, training curves), and prints the table. Offline; CPU by default.")
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--output-dir", "--out", default="sfr-demo", metavar="DIR",
                        help="where the report, plots, results and both models go (default ./sfr-demo)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test budget: {QUICK.max_steps} steps, {QUICK.samples} samples, "
                             f"{QUICK.max_new_tokens} new tokens per reply, {QUICK.limit} prompts, diagnostics on "
                             f"{QUICK.diagnose_limit} examples, {QUICK.bootstrap_resamples} bootstrap resamples; "
                             "flags below still override it (default: off, the full budget)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help=f"optimizer steps for each model (default {FULL.max_steps}; {QUICK.max_steps} with --quick)")
    parser.add_argument("--seed", type=int, default=None, help="training and sampling seed, the same for both (default 0)")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"sampled replies per prompt, at least 2 (default {FULL.samples}; {QUICK.samples} "
                             "with --quick)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"per reply (default {FULL.max_new_tokens}; {QUICK.max_new_tokens} with --quick)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"evaluate only N eval prompts, spread over the personas (default all 18; {QUICK.limit} with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                        help="where to train and sample (default cpu)")
    parser.add_argument("--no-diagnose", action="store_true", help="skip the Lock/Fork diagnostics of the SFR model")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage messages (the table is printed)")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo uses is local: never wait for the hub
    if args.quiet:  # transformers draws its own bars (loading weights); quiet means none at all
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        check_output_dir(args.output_dir, "--output-dir")  # before training: a bad path must not cost the run
        settings = demo_settings(args.quick, max_steps=args.max_steps, seed=args.seed, samples=args.samples,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, limit=args.limit,
                                 device=args.device, diagnose=False if args.no_diagnose else None)
        run_demo(args.output_dir, settings, progress=not args.quiet, quiet=args.quiet)
    except (ValueError, TypeError, OSError) as exc:
        print(f"sfr demo: error: {exc}", file=sys.stderr)
        return 2
    return 0
