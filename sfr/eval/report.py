"""Write evaluation results: JSON, a Markdown table and PNG bar plots (several models side by side).

Files are written to a temporary directory inside ``out_dir`` and then renamed into place, so an
interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[tuple[str, str]],
                   first_header: str = "model") -> str:
    """``rows``: row name -> {key: value}; ``columns``: (key, header) pairs. A GitHub Markdown table."""
    header = "| " + " | ".join([first_header] + [h for _, h in columns]) + " |"
    rule = "|" + "|".join(["---"] + ["---:" for _ in columns]) + "|"
    lines = [header, rule]
    for name, values in rows.items():
        lines.append("| " + " | ".join([str(name)] + [_fmt(values.get(key)) for key, _ in columns]) + " |")
    return "\n".join(lines) + "\n"


def bar_plots(rows: Mapping[str, Mapping[str, object]], columns: Sequence[tuple[str, str]], path: Path,
              title: str) -> Path | None:
    """One bar chart per metric (models side by side) in one PNG; metrics with no value are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(key, label) for key, label in columns
               if any(isinstance(v.get(key), (int, float)) and not math.isnan(v.get(key)) for v in rows.values())]
    if not present:
        return None
    names = list(rows)
    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes.flat, present):
        values = [rows[n].get(key) if rows[n].get(key) is not None else float("nan") for n in names]
        bars = ax.bar(range(len(names)), values, color=[colors[i % len(colors)] for i in range(len(names))])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        finite = [v for v in values if not math.isnan(v)]
        if finite and min(finite) >= 0:  # room for the labels; a visible axis even when all are 0
            ax.set_ylim(0, max(max(finite) * 1.15, 1e-3))
        ax.set_xticks(range(len(names)), [Path(n).name or n for n in names], rotation=20, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out_dir, files: Mapping[str, object], plots: Sequence[tuple] = ()) -> dict[str, str]:
    """Write ``files`` (name -> dict (JSON) or str) and ``plots`` ((name, rows, columns, title)) into
    ``out_dir`` atomically per file. Returns name -> written path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sfr-eval-", dir=out_dir))
    written = {}
    try:
        staged = []
        for name, content in files.items():
            target = staging / name
            text = content if isinstance(content, str) else json.dumps(content, indent=2, default=str)
            target.write_text(text, encoding="utf-8")
            staged.append(name)
        for name, rows, columns, title in plots:
            if bar_plots(rows, columns, staging / name, title) is not None:
                staged.append(name)
        for name in staged:
            os.replace(staging / name, out_dir / name)
            written[name] = str(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def dialogue_columns(rows: Mapping[str, Mapping[str, object]], groups: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``(metric, header)`` pairs of the dialogue metrics that at least one row has, in
    :data:`sfr.eval.dialogue.METRICS` order (optionally only those of ``groups``), headers with their
    direction arrow."""
    from sfr.eval.dialogue import ARROWS, METRICS

    return [(key, f"{label} {ARROWS[direction]}".strip()) for key, (label, direction, group) in METRICS.items()
            if (groups is None or group in groups) and any(r.get(key) is not None for r in rows.values())]


def write_dialogue_report(results: dict, out_dir) -> dict[str, str]:
    """``results.json``, ``samples.json``, ``report.md`` and ``metrics.png`` for :func:`evaluate_dialogue`."""
    rows = {name: {k: v for k, v in metrics.items() if k != "per_prompt"} for name, metrics in results["models"].items()}
    columns = dialogue_columns(rows)
    settings = results.get("settings", {})
    if settings.get("style_chance") is not None:  # the class count and chance next to the accuracy
        chance = f" ({settings.get('style_classes')} classes, chance {_fmt(settings['style_chance'])})"
        columns = [(key, header + chance if key == "style_accuracy" else header) for key, header in columns]
    table_rows = dict(rows)
    if results.get("corpus"):
        table_rows["corpus (known)"] = results["corpus"]
    if settings.get("style_classifier"):
        kind = str(settings["style_classifier"]).replace("_", "-")
        style = (f"Style accuracy: a {kind} persona classifier on sentence embeddings, trained on the data's "
                 f"reference replies, over {settings.get('style_classes')} personas. ")
        if settings.get("style_chance") is not None:
            style += (f"Without any style it would score {_fmt(settings['style_chance'])} by guessing uniformly "
                      f"and {_fmt(settings.get('style_majority'))} by always guessing the commonest persona of "
                      "these prompts. ")
    else:  # fit_persona_classifier needs the references of at least 2 system prompts
        style = ("Style accuracy: not computed: the persona classifier needs reference replies from ≥ 2 personas "
                 f"(distinct system prompts) among the prompts, and these prompts have "
                 f"{settings.get('personas', 'fewer than 2')}. ")
    if settings.get("reference_model"):
        reference = (f"reference-model NLL = the samples' NLL/token under `{settings['reference_model']}` "
                     "(fluency; also rewards bland text)"
                     + (f", {_fmt(settings['reference_nll_of_references'])} for the data's own replies"
                        if settings.get("reference_nll_of_references") is not None else "") + "; ")
    else:
        reference = "reference-model NLL: not computed (no `--reference-model`); "
    if any(row.get("heldout_nll") is not None for row in rows.values()):
        heldout = ("held-out NLL = the model's own NLL/token of the data's reference replies (lower = the model "
                   "still fits real replies); ")
    else:
        heldout = "held-out NLL: not computed (`--no-heldout-nll`, or prompts without a reference reply); "
    md = ["# Dialogue evaluation", "",
          f"Data: `{settings.get('data')}` ({settings.get('num_prompts')} prompts, {settings.get('samples')} samples "
          f"each, temperature {settings.get('temperature')}, top-p {settings.get('top_p')}, "
          f"max {settings.get('max_new_tokens')} new tokens, seed {settings.get('seed')}).", "",
          markdown_table(table_rows, columns),
          "↑ higher is better, ↓ lower is better"
          + (", → corpus: closest to the `corpus (known)` row (the corpus' known frequencies) is best" if
             results.get("corpus") else "")
          + ". Every metric is computed per prompt (over its samples) and averaged over prompts; self-BLEU is on "
          "sacrebleu's 0-100 scale. " + style
          + "Quality proxies: " + heldout + reference
          + "valid-reply and on-topic rate (embedded corpus only) are exact checks of well-formedness. "
          "See `sfr.eval.dialogue`.", ""]
    flagged = {name: m["language_warnings"] for name, m in results["models"].items() if m.get("language_warnings")}
    for name, reasons in flagged.items():
        md += [f"**Warning: the replies of `{name}` are probably not language** ({'; '.join(reasons)}). Its "
               "diversity and style numbers then describe noise (random text has distinct-2 near 1).", ""]
    summary = {key: value for key, value in results.items() if key != "samples"}
    files = {"results.json": summary, "report.md": "\n".join(md)}
    if "samples" in results:
        files["samples.json"] = results["samples"]
    return write_outputs(out_dir, files, [("metrics.png", table_rows, columns, "Dialogue evaluation")])


def write_code_report(results: dict, out_dir) -> dict[str, str]:
    """``results.json``, ``report.md`` and ``pass_at_k.png`` for :func:`evaluate_code` (one model or a
    mapping model -> results)."""
    by_model = results if "pass_at_k" not in results else {results.get("model", "model"): results}
    rows = {name: r["pass_at_k"] for name, r in by_model.items()}
    ks = sorted({key for r in rows.values() for key in r}, key=lambda s: int(s.split("@")[1]))
    columns = [(key, key) for key in ks]
    first = next(iter(by_model.values()))
    md = ["# Code evaluation", "",
          f"Data: `{first.get('data')}` ({first.get('num_problems')} problems, n = {first.get('n')} samples each, "
          f"temperature {first.get('temperature')}, {first.get('style')} prompts); programs run in the "
          f"`{first.get('sandbox')}` sandbox with a {first.get('timeout')} s timeout. pass@k: unbiased estimator "
          "(Chen et al. 2021), averaged over problems.", "", markdown_table(rows, columns)]
    return write_outputs(out_dir, {"results.json": results, "report.md": "\n".join(md)},
                         [("pass_at_k.png", rows, columns, "Code pass@k")])
