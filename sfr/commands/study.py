"""``sfr study``: Cross-Style Collapse, SFT vs SFR vs MTP across training seeds (:func:`sfr.study.run_study`)."""
from __future__ import annotations

import argparse
import os
import sys

from sfr.checks import check_output_dir
from sfr.study import CALIBRATION_CELLS, FULL, GRIDS, QUICK, run_study, study_settings


def _cells(settings) -> str:
    return ", ".join(cell.row_name(t) for cell in settings.cells for t in cell.temperatures)


EPILOG = f"""\
full study (default): seeds {' '.join(map(str, FULL.seeds))}; base stage {FULL.base_steps} steps (batch \
{FULL.base_batch_size}, {FULL.base_examples_per_prompt} un-styled replies per prompt; cached in the sfr cache); \
fine-tunes of {FULL.steps} steps (batch {FULL.batch_size}) for the rows {_cells(FULL)}; {FULL.samples} samples \
per (persona, prompt) pair, all 10 prompts x 9 personas. Measured (docs/study.md): 60 process-minutes of \
fine-tuning and evaluation, about 40 minutes of wall time with --jobs 2 on a shared 2-core CPU.
--quick: seeds {' '.join(map(str, QUICK.seeds))}, base {QUICK.base_steps} steps, fine-tunes of {QUICK.steps} \
steps for {_cells(QUICK)}, {QUICK.samples} samples, {QUICK.prompts} prompts: a smoke test of the pipeline (its \
numbers mean nothing), under 3 minutes on 2 CPU cores.

examples:
  sfr study --quick --output-dir study-quick     # the smoke test
  sfr study --jobs 2                             # the full study (docs/study.md), ./sfr-study/report.md
  sfr study --seeds 3 --output-dir study-3       # 3 training seeds (0-2): wider intervals, 60 % of the time
  sfr study --grid calibration --seeds 3 --jobs 2 --output-dir sfr-calibration   # docs/study.md's grid

--grid calibration: the SFR settings grid of docs/study.md (one change each against the default objective):
{', '.join(cell.name for cell in CALIBRATION_CELLS)}.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Measure Cross-Style Collapse and what SFR and MTP do about it. Train a base model on un-styled replies "
        "(once, cached), fine-tune it on persona data with one reply per (persona, prompt) pair with SFT, SFR and "
        "MTP at equal budget for every training seed (plus control rows: SFT sampled at T=1.1, SFR with targets "
        "scaled by sqrt(E) and lambda_max 10), sample every model with the same sampling seed, and report "
        "cross-style similarity / Self-BLEU, mode entropy, within-pair Self-BLEU, style and quality, each as the "
        "mean with a 95 % t interval across training seeds and as the seed-paired difference to SFT. Writes "
        "OUTPUT/results.json, report.md, metrics.png and vs_sft.png; OUTPUT/runs/ keeps every model and run (a "
        "rerun with the same settings reuses them). Offline; CPU.")
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--output-dir", "--out", default="sfr-study", metavar="DIR",
                        help="where results.json, report.md, the plots and runs/ go (default ./sfr-study)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test budget (see below); --seeds and --jobs still override it (default: off)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help=f"train every cell with the training seeds 0..N-1, at least 2 for an interval (default "
                             f"{len(FULL.seeds)}; {len(QUICK.seeds)} with --quick)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default=None,
                        help="the cells to train: objectives (SFT, SFR, MTP and the controls; the default) or "
                             "calibration (the SFR settings grid, see below)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="runs trained and evaluated at once, each in its own process with 1 torch thread "
                             "(default 1; 2 suits a 2-core CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the study uses is local: never wait for the hub
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        check_output_dir(args.output_dir, "--output-dir")  # before training: a bad path must not cost the run
        if args.seeds is not None and args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        settings = study_settings(args.quick, grid=args.grid, seeds=None if args.seeds is None else tuple(range(args.seeds)),
                                  jobs=args.jobs)
        result = run_study(args.output_dir, settings, progress=not args.quiet, quiet=args.quiet)
    except (ValueError, TypeError, OSError) as exc:
        print(f"sfr study: error: {exc}", file=sys.stderr)
        return 2
    print(open(result["files"]["report.md"], encoding="utf-8").read().split("## Every metric")[0])
    return 0
