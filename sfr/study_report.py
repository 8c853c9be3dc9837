"""The summary, report and plots of ``sfr study`` (:func:`sfr.study.run_study`).

Training seeds are the unit of replication. Per result row (a cell, or a cell sampled at another
temperature) and metric: the mean over seeds with the half-width of the 95 % Student-t interval
(``mean ± t_{0.975, n-1} * sd / sqrt(n)``; none with one seed); and, the headline, the seed-paired
difference to SFT (``row(seed) - sft(seed)``, same data order and base, same sampling seed) with its
t interval. The corpus and the base model are single reference values (no seeds).
"""
from __future__ import annotations

import math
from pathlib import Path

from sfr.study import STUDY_METRICS

CONFIDENCE = 0.95
# metric -> (label, direction, group) for the metrics sfr.eval.dialogue.METRICS does not have
_EXTRA_LABELS = {
    "cross_style_self_bleu_content": ("cross-style self-BLEU, content only", "down", "cross-style"),
    "pooled_mode_entropy": ("mode entropy pooled over styles (nats)", "ref", "cross-style"),
}
# the columns of the headline table and plot (the full tables have every metric)
HEADLINE = ("cross_style_similarity", "cross_style_self_bleu", "pooled_mode_entropy", "mode_entropy", "self_bleu",
            "style_accuracy", "valid_reply_rate", "heldout_nll")


def metric_label(key: str) -> tuple[str, str | None, str]:
    from sfr.eval.dialogue import METRICS

    return METRICS.get(key) or _EXTRA_LABELS[key]


def interval(values, confidence: float = CONFIDENCE) -> dict:
    """``{"mean", "half_width", "n"}`` of the Student-t interval of the mean (half_width None for n < 2)."""
    import numpy as np
    from scipy import stats

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "half_width": None, "n": 0}
    half = None
    if v.size >= 2:
        half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return {"mean": float(v.mean()), "half_width": half, "n": int(v.size)}


def row_names(runs) -> list[str]:
    """The result rows in the order they first appear."""
    return list(dict.fromkeys(run["name"] for run in runs))


def summarize(results: dict) -> dict:
    """``{"rows", "metrics", "confidence", "cells": {row: {metric: interval}}, "vs_sft": {row: {metric:
    interval of the seed-paired differences, plus "excludes_zero"}}, "references": {name: metrics}}``."""
    runs = results["runs"]
    sft = {run["seed"]: run for run in runs if run["name"] == "sft"}
    cells, vs_sft = {}, {}
    for name in row_names(runs):
        mine = [run for run in runs if run["name"] == name]
        cells[name] = {m: interval([run["metrics"].get(m) for run in mine]) for m in STUDY_METRICS}
        if name == "sft":
            continue
        vs_sft[name] = {}
        for m in STUDY_METRICS:
            diffs = [run["metrics"][m] - sft[run["seed"]]["metrics"][m] for run in mine if run["seed"] in sft
                     and run["metrics"].get(m) is not None and sft[run["seed"]]["metrics"].get(m) is not None]
            stats = interval(diffs)
            stats["excludes_zero"] = (stats["half_width"] is not None and abs(stats["mean"]) > stats["half_width"])
            vs_sft[name][m] = stats
    references = {name: ref["metrics"] for name, ref in results["references"].items()}
    return {"rows": row_names(runs), "metrics": list(STUDY_METRICS), "confidence": CONFIDENCE,
            "interval": "Student-t interval of the mean across training seeds", "cells": cells, "vs_sft": vs_sft,
            "references": references}


def _cell(stats: dict, signed: bool = False) -> str:
    if stats is None or stats["mean"] is None:
        return "n/a"
    text = f"{stats['mean']:+.3g}" if signed else f"{stats['mean']:.3g}"
    if stats["half_width"] is not None:
        text += f" ± {stats['half_width']:.2g}"
    return text + (" *" if stats.get("excludes_zero") else "")


def _value(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _header(metrics) -> list[str]:
    labels = []
    for key in metrics:
        label, direction, _ = metric_label(key)
        arrow = {"up": " ↑", "down": " ↓", "ref": " → corpus"}.get(direction, "")
        labels.append(label + arrow)
    return labels


def summary_tables(summary: dict, metrics=HEADLINE) -> tuple[str, str]:
    """Markdown: (absolute values with the corpus and base rows, differences vs SFT of the same seed)."""
    seeds = {name: max(s["n"] for s in summary["cells"][name].values()) for name in summary["rows"]}
    head = "| row | seeds | " + " | ".join(_header(metrics)) + " |\n|---|---:|" + "---:|" * len(metrics) + "\n"
    absolute = head
    for name, values in summary["references"].items():
        absolute += f"| {name} | – | " + " | ".join(_value(values.get(m)) for m in metrics) + " |\n"
    for name in summary["rows"]:
        absolute += f"| {name} | {seeds[name]} | " + " | ".join(_cell(summary["cells"][name][m]) for m in metrics) + " |\n"
    paired = head.replace("| row |", "| row − sft |")
    for name, values in summary["vs_sft"].items():
        paired += f"| {name} | {seeds[name]} | " + " | ".join(_cell(values[m], signed=True) for m in metrics) + " |\n"
    return absolute, paired


def compute_table(runs) -> str:
    """Markdown: per result row, the mean training and evaluation wall time over its seeds."""
    import numpy as np

    lines = ["| row | seeds | train s | evaluate s |", "|---|---:|---:|---:|"]
    for name in row_names(runs):
        mine = [run["timings"] for run in runs if run["name"] == name]
        lines.append(f"| {name} | {len(mine)} | {np.mean([t['train_s'] for t in mine]):.0f} | "
                     f"{np.mean([t['eval_s'] for t in mine]):.0f} |")
    return "\n".join(lines) + "\n"


def _versus(cells) -> str:
    """``SFT vs SFR vs MTP``: the objectives among the cells, in that order."""
    present = {cell["objective"] for cell in cells}
    return " vs ".join(name.upper() for name in ("sft", "sfr", "mtp") if name in present)


def _run_seconds(runs) -> str:
    """The runs' own recorded time (what the study costs from scratch), and how many this invocation reused."""
    trained = {(run["cell"], run["seed"]): run["timings"]["train_s"] for run in runs}
    total = sum(trained.values()) + sum(run["timings"]["eval_s"] for run in runs)
    reused = len({(run["cell"], run["seed"]) for run in runs if run.get("reused")})
    note = f"; {reused} of the {len(trained)} runs were reused from an earlier invocation" if reused else ""
    return f"The fine-tunes and evaluations took {total / 60:.1f} process-minutes as recorded by each run{note}."


def _plots(results: dict, out: Path) -> dict[str, str]:
    from sfr.eval.report import bar_plots

    summary = results["summary"]
    columns = [(key, label) for key, label in zip(HEADLINE, _header(HEADLINE))]
    rows = {name: dict(values) for name, values in summary["references"].items()}
    errors = {}
    for name in summary["rows"]:
        rows[name] = {m: s["mean"] for m, s in summary["cells"][name].items()}
        errors[name] = {m: (s["mean"] - s["half_width"], s["mean"] + s["half_width"])
                        for m, s in summary["cells"][name].items() if s["half_width"] is not None}
    note = ("error bars: 95 % t interval across training seeds (corpus and base: single values); "
            "paired differences in vs_sft.png")
    files = {}
    if bar_plots(rows, columns, out / "metrics.png", "sfr study: mean over training seeds", errors, note):
        files["metrics.png"] = str(out / "metrics.png")
    diffs = {name: {m: s["mean"] for m, s in values.items()} for name, values in summary["vs_sft"].items()}
    diff_errors = {name: {m: (s["mean"] - s["half_width"], s["mean"] + s["half_width"])
                          for m, s in values.items() if s["half_width"] is not None}
                   for name, values in summary["vs_sft"].items()}
    if diffs and bar_plots(diffs, columns, out / "vs_sft.png", "sfr study: difference to SFT of the same seed",
                           diff_errors, "error bars: 95 % t interval of the seed-paired differences; 0 = SFT"):
        files["vs_sft.png"] = str(out / "vs_sft.png")
    return files


def render_report(results: dict) -> str:
    """``report.md``: the setting, the two tables (headline metrics, then every metric), plots, timings."""
    settings, summary, timings = results["settings"], results["summary"], results["timings"]
    absolute, paired = summary_tables(summary)
    all_absolute, all_paired = summary_tables(summary, summary["metrics"])
    base = settings["base"]
    quick = (" **--quick: a smoke test on a tiny budget; its numbers mean nothing.**" if settings["quick"] else "")
    cells = "; ".join(f"`{c['name']}` = objective {c['objective']}"
                      + (f" with {', '.join(f'{k}={v}' for k, v in c['overrides'].items())}" if c["overrides"] else "")
                      + (f", sampled at T = {', '.join(f'{t:g}' for t in c['temperatures'])}"
                         if len(c["temperatures"]) > 1 else "") for c in settings["cells"])
    md = [
        f"# sfr study: Cross-Style Collapse, {_versus(settings['cells'])} across training seeds", "",
        f"Base stage: `sfr-tiny` trained from its random init with plain CE for {base['steps']} steps (batch "
        f"{base['batch_size']}, seed 0) on {base['examples_per_prompt']} un-styled replies per prompt. Fine-tunes "
        f"from it: {settings['steps']} steps, batch {settings['batch_size']}, learning rate "
        f"{settings['learning_rate']:g} (cosine), on the train split with {settings['examples_per_pair']} "
        f"reply per (persona, prompt) pair, modes {settings['allocation']}; the `sfr train` tiny-model defaults "
        f"otherwise. Cells: {cells}. Training seeds: {', '.join(map(str, settings['seeds']))}.{quick}", "",
        f"Evaluation: {settings['samples']} replies (≤ {settings['max_new_tokens']} new tokens, sampling seed "
        f"{settings['sampling_seed']}, the same for every model) to every (persona, prompt) pair of "
        f"{settings['prompts'] or 10} prompts × 9 personas. Cross-style metrics per prompt over the 9 personas, "
        "then averaged over prompts; the others per pair, then averaged; held-out NLL of the eval split's "
        "references. `corpus` = replies drawn from the corpus' own process (the same finite-sample metrics), "
        "`base` = the base model (trained once: no seed interval).", "",
        "## Mean ± 95 % t interval across training seeds", "", absolute,
        "## Difference to SFT of the same training seed", "",
        "Mean ± 95 % t interval of the seed-wise differences; `*` = the interval excludes 0.", "", paired,
        "![means](metrics.png)", "", "![differences to SFT](vs_sft.png)", "",
        "## Every metric", "", all_absolute, all_paired,
        "Arrows: ↑ higher is better, ↓ lower is better, → corpus: closest to the corpus row is best. Cross-style "
        "self-BLEU and similarity: lower = the personas' replies to a prompt differ more (a lower value is not "
        "better by itself: random text is lowest). Cross-style self-BLEU saturates on this corpus: each prompt has "
        "only 7 content templates, so a well-formed reply finds its content among the other personas' replies (see "
        "the corpus row of the content-only self-BLEU).", "",
        "Wall seconds per run (mean over seeds; the `-T` rows reuse their cell's trained models):", "",
        compute_table(results["runs"]),
        f"Compute ({settings['device']}, {settings['jobs']} process(es), 1 torch thread each): base stage "
        f"{timings['base_s']:.0f} s (0 when cached), reference rows {timings['references_s']:.0f} s, fine-tunes and "
        f"evaluations {timings['runs_s']:.0f} s, total {timings['total_s']:.0f} s wall. {_run_seconds(results['runs'])}",
        ""]
    return "\n".join(md)


def write_study_report(results: dict, out) -> dict[str, str]:
    """``results.json``, ``report.md``, ``metrics.png``, ``vs_sft.png`` in ``out``; name -> path."""
    from sfr.eval.report import write_outputs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = _plots(results, out)
    files.update(write_outputs(out, {"results.json": results, "report.md": render_report(results)}))
    return files
