"""``sfr diagnose``: Lock/Fork diagnostics of a trained model (:func:`sfr.diagnostics.diagnose`)."""
from __future__ import annotations

import argparse
import sys
import warnings

from sfr.diagnostics import DiagnoseConfig, diagnose
from sfr.flow import ODE_METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Lock/Fork diagnostics: for every response position of the data, integrate the trained flow head's ODE "
        "dx/ds = v(x, s, h) from S Gaussian source draws to s = 1 and measure how spread out the S endpoints are "
        "(fork score = 1 - mean pairwise cosine; near 0 = the future is locked, larger = it forks). Writes "
        "fork_scores.html (tokens coloured by fork score on a fixed scale: white = 0, locked, to red = 1, as "
        "spread as random directions), fork_histogram.png and fork_scores.json to --out, and says when the "
        "scores' spread across positions is below twice their sampling noise (estimated from the draws).")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a directory written by `sfr train` with --objective sfr or mtp (model + sfr_head/; "
                             "an SFT model has no head)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="examples to score: JSONL/JSON in messages or prompt/completion format, or the "
                             "Synthetic-Persona-Chat CSV (default: the embedded corpus' eval split)")
    parser.add_argument("--out", default="sfr-diagnose", metavar="DIR", help="output folder (default sfr-diagnose)")
    parser.add_argument("--num-draws", type=int, default=16, help="source draws S per position (default 16, >= 2)")
    parser.add_argument("--steps", type=int, default=16, help="ODE steps from s=0 to s=1 (default 16)")
    parser.add_argument("--solver", choices=ODE_METHODS, default="midpoint", help="fixed-step ODE solver (default midpoint)")
    parser.add_argument("--limit", type=int, default=20, help="score the first N examples (default 20)")
    parser.add_argument("--max-length", type=int, default=512,
                        help="keep the last N tokens of an example (default 512, at most the model's context)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the source draws (example i uses seed + i; default 0)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")


def main(args: argparse.Namespace) -> int:
    data = args.data
    if data is None:
        from sfr.corpus import default_corpus_path

        data = str(default_corpus_path("eval"))
    config = DiagnoseConfig(model=args.model, data=data, out=args.out, num_draws=args.num_draws,
                            steps=args.steps, solver=args.solver, limit=args.limit, max_length=args.max_length,
                            seed=args.seed, device=args.device)
    try:
        summary = diagnose(config)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"sfr diagnose: error: {exc}", file=sys.stderr)
        return 2
    print(f"scored {summary['anchors']} positions; mean fork score {summary['mean_fork_score']:.4f} "
          f"(median {summary['median_fork_score']:.4f}); mean endpoint norm {summary['mean_endpoint_norm']:.3g} "
          f"(source draws: {summary['source_norm']:.3g}; unit-norm targets: 1)")
    if summary["noise_note"]:
        warnings.warn(summary["noise_note"], UserWarning, stacklevel=1)
    print(f"wrote {config.out}/fork_scores.html, fork_histogram.png, fork_scores.json")
    return 0
