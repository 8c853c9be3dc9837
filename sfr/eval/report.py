"""Write evaluation results: JSON, a Markdown table and PNG bar plots (several models side by side), and
the report and training curves of ``sfr demo``.

Files are written to a temporary directory inside ``out_dir`` and then renamed into place, so an
interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence


def format_value(value, digits: int = 4) -> str:
    """A table cell: ``n/a`` for None or NaN, ``digits`` significant digits for a non-integer number below
    1000 (one decimal above), anything else (integers included) as ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[tuple[str, str]],
                   first_header: str = "model") -> str:
    """``rows``: row name -> {key: value}; ``columns``: (key, header) pairs. A GitHub Markdown table."""
    header = "| " + " | ".join([first_header] + [h for _, h in columns]) + " |"
    rule = "|" + "|".join(["---"] + ["---:" for _ in columns]) + "|"
    lines = [header, rule]
    for name, values in rows.items():
        lines.append("| " + " | ".join([str(name)] + [format_value(values.get(key)) for key, _ in columns]) + " |")
    return "\n".join(lines) + "\n"


def bar_plots(rows: Mapping[str, Mapping[str, object]], columns: Sequence[tuple[str, str]], path: Path,
              title: str, errors: Mapping[str, Mapping[str, tuple]] | None = None, note: str | None = None) -> Path | None:
    """One bar chart per metric (models side by side) in one PNG; metrics with no value are left out.

    ``errors[row][key] = (low, high)``: an interval drawn as an error bar on that bar (say in ``note``,
    printed under the plots, which interval it is)."""
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
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows + (0.4 if note else 0)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes.flat, present):
        values = [rows[n].get(key) if rows[n].get(key) is not None else float("nan") for n in names]
        nan = (float("nan"), float("nan"))  # no interval: no error bar
        bounds = [(errors or {}).get(n, {}).get(key) or nan for n in names]
        yerr = [[max(v - low, 0.0) if low == low else low for v, (low, _) in zip(values, bounds)],
                [max(high - v, 0.0) if high == high else high for v, (_, high) in zip(values, bounds)]]
        bars = ax.bar(range(len(names)), values, color=[colors[i % len(colors)] for i in range(len(names))],
                      yerr=yerr if errors else None, capsize=3 if errors else 0, ecolor="black")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        finite = [v for v in values if not math.isnan(v)]
        tops = [max(v, high) if high == high else v for v, (_, high) in zip(values, bounds) if not math.isnan(v)]
        bottoms = [min(v, low) if low == low else v for v, (low, _) in zip(values, bounds) if not math.isnan(v)]
        if finite and min(bottoms) >= 0:  # room for the labels; a visible axis even when all are 0
            ax.set_ylim(0, max(max(tops) * 1.15, 1e-3))
        else:
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(names)), [Path(n).name or n for n in names], rotation=20, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.suptitle(title)
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
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
        chance = f" ({settings.get('style_classes')} classes, chance {format_value(settings['style_chance'])})"
        columns = [(key, header + chance if key == "style_accuracy" else header) for key, header in columns]
    table_rows = dict(rows)
    if results.get("corpus"):
        table_rows["corpus (known)"] = results["corpus"]
    if settings.get("style_classifier"):
        kind = str(settings["style_classifier"]).replace("_", "-")
        style = (f"Style accuracy: a {kind} persona classifier on sentence embeddings, trained on the data's "
                 f"reference replies, over {settings.get('style_classes')} personas. ")
        if settings.get("style_chance") is not None:
            style += (f"Without any style it would score {format_value(settings['style_chance'])} by guessing uniformly "
                      f"and {format_value(settings.get('style_majority'))} by always guessing the commonest persona of "
                      "these prompts. ")
    else:  # fit_persona_classifier needs the references of at least 2 system prompts
        style = ("Style accuracy: not computed: the persona classifier needs reference replies from ≥ 2 personas "
                 f"(distinct system prompts) among the prompts, and these prompts have "
                 f"{settings.get('personas', 'fewer than 2')}. ")
    if settings.get("reference_model"):
        reference = (f"reference-model NLL = the samples' NLL/token under `{settings['reference_model']}` "
                     "(fluency; also rewards bland text)"
                     + (f", {format_value(settings['reference_nll_of_references'])} for the data's own replies"
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
          "Cross-style self-BLEU / similarity: per question asked under ≥ 2 system prompts, how alike the styles' "
          "replies are (lower = they differ more), averaged over questions; per-question values in `results.json` "
          "under `cross_style` (n/a when no question has 2 styles). See `sfr.eval.dialogue`.", ""]
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


# ---- sfr demo ----------------------------------------------------------------------------------------------
def verdict_summary(compare: dict) -> list[str]:
    """One Markdown bullet per metric group: on which metrics SFR or SFT is better, or neither (from
    the ``verdict`` of :func:`sfr.demo.comparisons`)."""
    from sfr.eval.dialogue import METRICS

    lines = []
    for group in ("diversity", "style", "quality"):
        keys = [k for k, (_, _, g) in METRICS.items() if g == group and compare.get(k, {}).get("verdict")]
        if not keys:
            continue
        counts = {v: [METRICS[k][0] for k in keys if compare[k]["verdict"] == v] for v in ("SFR", "SFT", "tie")}
        parts = [f"SFR better on {', '.join(counts['SFR']) or 'none'}",
                 f"SFT better on {', '.join(counts['SFT']) or 'none'}"]
        if counts["tie"]:
            parts.append(f"no clear difference on {', '.join(counts['tie'])}")
        lines.append(f"* **{group}**: " + "; ".join(parts) + ".")
    return lines


def _loss_points(history: list[dict], key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in history if key in h and "step" in h and "train_runtime" not in h}


def plot_losses(histories: dict[str, list[dict]], path: Path) -> Path:
    """Training curves from the runs' ``log_history``: the CE of both runs (the same quantity) and their
    difference, and the SFR run's flow-matching loss with lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.6))
    ce = {name: _loss_points(history, "ce_loss") or _loss_points(history, "loss") for name, history in histories.items()}
    for name, points in ce.items():
        left.plot(list(points), list(points.values()), label=f"{name}")
    left.set_xlabel("optimizer step")
    left.set_ylabel("cross-entropy (nats/token)")
    left.set_title("training CE loss")
    left.legend()
    left.grid(alpha=0.3)
    if len(ce) == 2:
        (a, pa), (b, pb) = ce.items()
        steps = sorted(set(pa) & set(pb))
        middle.plot(steps, [pb[s] - pa[s] for s in steps], color="C3")
        middle.axhline(0.0, color="grey", linewidth=0.8)
        middle.set_title(f"CE difference {b} − {a}")
    middle.set_xlabel("optimizer step")
    middle.set_ylabel("nats/token")
    middle.grid(alpha=0.3)
    flow, lam = _loss_points(histories.get("SFR", []), "sfr_loss"), _loss_points(histories.get("SFR", []), "sfr_lambda")
    if flow:
        right.plot(list(flow), list(flow.values()), color="C1", label="SFR flow loss")
        right.set_ylabel("flow-matching loss")
        twin = right.twinx()
        twin.plot(list(lam), list(lam.values()), color="C2", linestyle="--", label="λ")
        twin.set_ylabel("λ (SFR gradient weight)")
        right.legend(handles=right.get_lines() + twin.get_lines(), loc="upper right")
    right.set_xlabel("optimizer step")
    right.set_title("SFR run: flow loss and λ")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_demo_report(results: dict, table: str, samples: dict) -> str:
    """``report.md`` of ``sfr demo`` (:func:`sfr.demo.run_demo`): settings, the table, what the metrics mean,
    plots, the diagnostics and sample replies. ``results`` is the demo's ``results.json`` content."""
    demo, timings, settings = results["demo"], results["timings"], results["settings"]
    train = results["training"]
    models = list(demo["runs"])  # SFT, SFR
    quick = " (--quick: a smoke-test budget; these numbers mean little)" if demo["quick"] else ""
    md = [
        "# sfr demo: SFT vs SFR on the embedded default", "",
        f"Both runs fine-tune the embedded tiny LM (`sfr-tiny`, ~1M parameters) on the train split of the embedded "
        f"persona corpus with the same settings: {demo['max_steps']} optimizer steps, seed {demo['seed']}, the "
        "`sfr train` defaults for the tiny model (batch 8, learning rate 1e-3, cosine schedule); only the objective "
        "differs (SFT = cross-entropy; SFR = cross-entropy + Semantic Flow Regularization, phase A then a ramp of "
        f"λ to 1){quick}.", "",
        f"Evaluation: {settings['samples']} sampled replies (temperature {settings['temperature']}, at most "
        f"{settings['max_new_tokens']} new tokens, seed {settings['seed']}) for each of {settings['num_prompts']} "
        "prompts of the corpus' eval split: persona x question pairs never seen together in training.", "",
        f"Device: {demo['device']} ({demo['torch_threads']} torch threads). Wall time: "
        f"SFT training {timings['train_sft_s']:.0f} s, SFR training {timings['train_sfr_s']:.0f} s, "
        f"evaluation {timings['eval_s']:.0f} s"
        + (f", diagnostics {timings['diagnose_s']:.0f} s" if "diagnose_s" in timings else "")
        + f"; total {timings['total_s']:.0f} s.", "",
        "## Results", "", table,
        "↑ higher is better, ↓ lower is better, → corpus: closest to the corpus' known value is best. Each metric is "
        "computed per prompt and averaged over prompts. SFR − SFT is the mean per-prompt difference with a 95 % "
        "paired bootstrap interval over prompts: an interval that contains 0 means the two models are not "
        "distinguishable on these prompts. The interval covers the choice of prompts and samples, not the training "
        "seed: both models come from one training run each (rerun with other `--seed` values to see that spread, or "
        "`sfr study` for intervals across training seeds). Cross-style metrics are computed per question over the "
        "personas that ask it (2 per question in the eval split) and averaged over questions (their interval is over "
        "questions). `base` = the untrained `sfr-tiny` both runs start from, sampled and scored the same way. The "
        "plots' error bars are each model's own 95 % bootstrap interval over prompts.", "",
        "Summary (a model is called better only when the interval excludes 0):", "",
        *verdict_summary(results["comparison"]), "",
        "## What the metrics mean", "",
        "* **Diversity** within one prompt's samples: distinct-n = unique / total whitespace n-grams; self-BLEU = mean "
        "sacrebleu sentence-BLEU of each sample against the others (0-100, lower = more diverse); embedding "
        "diversity = 1 − mean pairwise cosine of all-MiniLM-L6-v2 embeddings.",
        "* **Style**: style accuracy = how often a persona classifier (logistic regression on sentence embeddings, "
        "trained on the eval references) recognises the requested persona; style-marker rate = exact check of the "
        "persona's marker (\"arr\", \"BEEP.\", ...); mode coverage / entropy / TV distance compare the kinds of "
        "answer sampled (e.g. pasta / curry / salad) with the corpus' known frequencies (e.g. 0.6 / 0.3 / 0.1). "
        "A collapsed model keeps the style but answers only the top mode: low coverage and entropy, high TV.",
        "* **Quality proxies**: held-out NLL/token = each model's own negative log-likelihood of the eval split's "
        "reference replies (unseen persona x question pairs; lower = it still fits real replies, so diversity was "
        "not bought with broken text); valid-reply rate = fraction of samples that are exactly one of the "
        "well-formed replies of that persona to that question; on-topic rate = fraction that give exactly one "
        "valid kind of answer.", "",
        "* **Cross-style**: cross-style self-BLEU = sacrebleu sentence-BLEU of each reply against the replies of the "
        "other personas to the same question; cross-style similarity = mean cosine between embeddings of replies of "
        "different personas. Lower = the personas' replies differ more; a model with \"Cross-Style Collapse\" gives "
        "every persona the same answer (see `sfr study` and docs/study.md).", "",
        "## Plots", "",
        "![diversity](diversity.png)", "", "![style](style.png)", "", "![quality](quality.png)", "",
        "![training curves](loss.png)", "",
        f"Final training loss (last log): SFT CE {format_value(train['SFT'].get('final_ce_loss'))}; SFR CE "
        f"{format_value(train['SFR'].get('final_ce_loss'))}, flow loss {format_value(train['SFR'].get('final_sfr_loss'))}.", ""]
    if results.get("diagnose"):
        d = results["diagnose"]
        md += ["## Lock/Fork diagnostics (SFR model)", "",
               f"{d['anchors']} response positions scored; mean fork score {format_value(d['mean_fork_score'])}, median "
               f"{format_value(d['median_fork_score'])} (1 − mean pairwise cosine of {d['num_draws']} flow endpoints; 0 = locked, 1 = "
               f"unrelated). The endpoints' mean norm is {format_value(d['mean_endpoint_norm'], 3)}, against "
               f"{format_value(d['source_norm'], 3)} for the Gaussian source draws and 1 for the (normalised) target "
               "embeddings: the closer to 1, the more the head has learned to carry the noise to real futures; "
               "far from it, the fork scores mostly reflect the source noise. "
               "Tokens coloured by fork score (fixed scale, white = 0 to red = 1): "
               "[diagnose/fork_scores.html](diagnose/fork_scores.html); histogram: "
               "[diagnose/fork_histogram.png](diagnose/fork_histogram.png).", ""]
        if d.get("noise_note"):
            md += [f"**Note:** {d['noise_note']}.", ""]
    md += ["## Sample replies (first 3 samples of the first 3 prompts)", ""]
    for i in range(min(3, settings["num_prompts"])):
        first = samples[models[0]][i]
        question = " / ".join(m["content"] for m in first["messages"])
        md.append(f"**{question}**")
        md.append("")
        for name in models:
            for reply in samples[name][i]["replies"][:3]:
                md.append(f"* {name}: {json.dumps(reply, ensure_ascii=False)}")
        md.append("")
    md += [f"Everything measured is in `results.json` (per-prompt values included) and `samples.json`; the models "
           f"are in `{Path(demo['runs']['SFT']).parent}/`.", ""]
    return "\n".join(md)
