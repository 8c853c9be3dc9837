"""``sfr demo``: train SFT and SFR on the embedded default with the same budget and seed, compare them.

What it does (:func:`run_demo`):

1. Fine-tunes the embedded tiny LM (``sfr-tiny``) on the train split of the embedded persona corpus
   twice, with :func:`sfr.train.train`: once with plain cross-entropy (``objective="sft"``) and once
   with CE + SFR (``objective="sfr"``). Both runs get the very same settings (the
   :data:`sfr.training_args.TINY_DEFAULTS` of ``sfr train``, the same ``--max-steps``, batch, learning rate,
   seed and data order); only the objective differs. With ``--max-steps`` other than the default the
   warm-up and the SFR phase lengths keep their proportions of ``TINY_DEFAULTS`` (phase A = 20 %, ramp
   = 30 % of the steps; :func:`sfr.training_args.tiny_defaults`).
2. Samples ``--samples`` replies per prompt of the corpus' *eval* split (persona x prompt pairs unseen
   in training) from both models with the same sampling seed, and scores them with the dialogue
   evaluation (:func:`sfr.eval.dialogue.evaluate_dialogue`): diversity (distinct-1/2, self-BLEU,
   embedding diversity), style (persona-classifier accuracy, exact style-marker rate, mode coverage /
   entropy / TV distance against the corpus' known mode frequencies) and quality proxies (held-out NLL
   of the eval references, exact valid-reply and on-topic rates).
   The untrained ``sfr-tiny`` (the start of both runs) is scored the same way: the ``base`` column.
   Cross-style metrics (:mod:`sfr.eval.cross_style`) compare the personas' replies to the same question
   (eval-split questions held out for 2 personas each).
3. For every metric, the difference SFR - SFT with a 95 % paired bootstrap interval over the prompts
   (over the questions for the cross-style metrics): when it contains 0 the two models are not
   distinguishable on this data. The plots' error bars are each model's own 95 % bootstrap interval
   over prompts. Both cover prompts and samples of one training run, not training seeds (``sfr
   study`` replicates over seeds).
4. Runs the Lock/Fork diagnostics (:mod:`sfr.diagnostics`) on the SFR model (SFT has no flow head).
5. Writes ``OUTPUT/report.md`` (the table, settings, wall times, plots, sample replies),
   ``results.json``, ``samples.json``, ``diversity.png``, ``style.png``, ``quality.png``, ``loss.png``
   (training curves from each run's ``trainer_state.json``), the two models under ``OUTPUT/runs/`` and
   prints the table.

The report states whatever was measured, whichever model wins; nothing is tuned for either model.
``--quick`` is a much smaller budget (a smoke test that CI runs; its numbers mean little).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sfr.checks import check_device, check_int

MODELS = ("SFT", "SFR")
OBJECTIVE_OF = {"SFT": "sft", "SFR": "sfr"}  # the objective (sfr.model.OBJECTIVES) of each run
BASE = "base"  # the untrained sfr-tiny both runs start from, scored as a reference


@dataclass
class DemoSettings:
    """The budget of one demo run (see :func:`demo_settings` for the defaults and ``--quick``)."""

    max_steps: int = 800
    seed: int = 0
    samples: int = 32
    max_new_tokens: int = 48
    temperature: float = 1.0
    limit: int | None = None  # eval prompts (None: all 18 of the eval split)
    device: str = "cpu"
    diagnose: bool = True
    diagnose_limit: int = 18
    bootstrap_resamples: int = 2000
    quick: bool = False


FULL = DemoSettings()
QUICK = DemoSettings(max_steps=30, samples=4, max_new_tokens=24, limit=6, diagnose_limit=3, bootstrap_resamples=500,
                     quick=True)


def demo_settings(quick: bool = False, **overrides) -> DemoSettings:
    """The default (or ``--quick``) settings with ``overrides`` (``None`` values are ignored)."""
    base = asdict(QUICK if quick else FULL)
    base.update({k: v for k, v in overrides.items() if v is not None})
    settings = DemoSettings(**base)
    check_int("max_steps", settings.max_steps)
    check_int("samples", settings.samples, 2, why=" (diversity needs several replies per prompt)")
    check_int("max_new_tokens", settings.max_new_tokens)
    if not settings.temperature > 0:
        raise ValueError(f"temperature must be > 0 (sampling), got {settings.temperature!r}")
    check_int("limit", settings.limit, optional=True)
    if settings.device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be cpu, cuda or auto, got {settings.device!r}")
    return settings


def _device(settings: DemoSettings) -> str:
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(settings.device, "device")
    return settings.device


def device_description(device: str) -> str:
    """E.g. ``"CPU, 2 cores"`` (the cores this process may run on) or the GPU's name."""
    if device == "cuda":
        import torch

        return f"GPU, {torch.cuda.get_device_name()}"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return f"CPU, {cores} cores"


def training_arguments(objective: str, output_dir, settings: DemoSettings, device: str, progress: bool):
    """The :class:`sfr.training_args.SFRTrainingArguments` of one demo run: identical for both objectives."""
    from sfr.training_args import SFRTrainingArguments

    steps = settings.max_steps
    return SFRTrainingArguments.for_embedded_default(  # warm-up and phases scale with max_steps
        output_dir=str(output_dir), objective=objective, max_steps=steps, seed=settings.seed,
        data_seed=settings.seed, logging_steps=max(1, steps // 50), save_strategy="no", report_to=[], disable_tqdm=not progress,
        use_cpu=device == "cpu", overwrite_output_dir=True)  # a demo run again replaces the last one


def _say(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[sfr demo] {message}", file=sys.stderr, flush=True)


# ---- the table ------------------------------------------------------------------------------------------
def comparisons(results: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """Per metric: SFR - SFT (mean over prompts of the per-prompt difference) with a 95 % paired bootstrap
    interval over prompts, and the verdict ("SFR", "SFT" better, "tie" when the interval holds 0, or
    None for a metric without a direction). Prompts where either value is missing are left out."""
    from sfr.eval.dialogue import METRICS
    from sfr.eval.metrics import paired_bootstrap

    sft, sfr = (results["models"][name] for name in MODELS)
    out = {}
    for key, (_, direction, _) in METRICS.items():
        pairs = [(a, b) for a, b in zip(per_unit(sft, key), per_unit(sfr, key)) if a is not None and b is not None]
        if not pairs:
            continue
        stats = paired_bootstrap([a for a, _ in pairs], [b for _, b in pairs], num_resamples=resamples, seed=seed)
        verdict = None
        if direction in ("up", "down") and not math.isnan(stats["low"]):
            if stats["low"] > 0 or stats["high"] < 0:
                sfr_higher = stats["low"] > 0
                verdict = "SFR" if sfr_higher == (direction == "up") else "SFT"
            else:
                verdict = "tie"
        elif direction == "ref" and results.get("corpus") and key in results["corpus"]:
            target = results["corpus"][key]
            gap = [abs(b - target) - abs(a - target) for a, b in pairs]  # < 0: SFR closer to the corpus
            closer = paired_bootstrap([0.0] * len(gap), gap, num_resamples=resamples, seed=seed)
            stats["closer_to_corpus"] = closer
            if not math.isnan(closer["low"]):
                verdict = "SFR" if closer["high"] < 0 else "SFT" if closer["low"] > 0 else "tie"
        stats["verdict"] = verdict
        out[key] = stats
    return out


def per_unit(metrics: dict, key: str) -> list:
    """A model's values of ``key`` per prompt, or per question for the cross-style metrics."""
    from sfr.eval.dialogue import METRICS

    if METRICS[key][2] == "cross-style":
        return list((metrics.get("cross_style") or {}).get(key) or [])
    return list(metrics["per_prompt"].get(key) or [])


def model_intervals(results: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """Per model and metric: its mean with a 95 % bootstrap interval over prompts (over questions for the
    cross-style metrics), :func:`sfr.eval.metrics.bootstrap_interval`; the plots' error bars."""
    from sfr.eval.dialogue import METRICS
    from sfr.eval.metrics import bootstrap_interval

    out = {}
    for name, metrics in results["models"].items():
        out[name] = {}
        for key in METRICS:
            values = [v for v in per_unit(metrics, key) if v is not None] if key != "reference_perplexity" else []
            if values:
                out[name][key] = bootstrap_interval(values, resamples, seed=seed)
    return out


def demo_table(results: dict, compare: dict) -> str:
    """The Markdown table: one row per metric, the two models, SFR - SFT [95 % CI], the corpus target, the base."""
    from sfr.eval.dialogue import ARROWS, METRICS
    from sfr.eval.report import format_value

    corpus = results.get("corpus") or {}
    base = results["models"].get(BASE, {})
    lines = ["| metric | better | SFT | SFR | SFR − SFT [95% CI] | corpus | base |",
             "|---|:---:|---:|---:|---:|---:|---:|"]
    for key, (label, direction, _) in METRICS.items():
        values = [results["models"][name].get(key) for name in MODELS]
        if all(v is None for v in values):
            continue
        stats = compare.get(key)
        if stats is None:
            delta = "n/a"
        else:
            delta = f"{stats['diff']:+.3g}"
            if not math.isnan(stats["low"]):
                delta += f" [{stats['low']:+.3g}, {stats['high']:+.3g}]"
        cells = [format_value(values[0]), format_value(values[1]), delta,
                 format_value(corpus.get(key)) if key in corpus else "", format_value(base.get(key))]
        lines.append(f"| {label} | {ARROWS[direction] or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- training curves --------------------------------------------------------------------------------------
def _log_history(run_dir: Path) -> list[dict]:
    state = run_dir / "trainer_state.json"
    if not state.is_file():
        return []
    return json.loads(state.read_text()).get("log_history", [])


# ---- the demo -----------------------------------------------------------------------------------------------
def run_demo(output_dir="sfr-demo", settings: DemoSettings | None = None, *, progress: bool = True,
             quiet: bool = False) -> dict:
    """Train SFT and SFR, evaluate both, write the report (see the module docstring).

    Returns the content of ``results.json`` plus ``"table"`` (the Markdown table) and ``"files"``
    (name -> path of everything written).
    """
    import torch

    from sfr.corpus import default_corpus_path
    from sfr.eval.dialogue import evaluate_dialogue
    from sfr.eval.report import bar_plots, dialogue_columns, plot_losses, render_demo_report
    from sfr.loading import load_model_and_tokenizer
    from sfr.train import train

    settings = settings or demo_settings()
    device = _device(settings)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    runs, train_metrics = {}, {}
    for name in MODELS:
        run_dir = out / "runs" / OBJECTIVE_OF[name]
        _say(f"training {name} ({settings.max_steps} steps, seed {settings.seed}, {device}) -> {run_dir}", quiet)
        t0 = time.perf_counter()
        args = training_arguments(OBJECTIVE_OF[name], run_dir, settings, device, progress)
        result = train(args, quiet=quiet)
        timings[f"train_{name.lower()}_s"] = round(time.perf_counter() - t0, 2)
        runs[name] = Path(result.output_dir)
        train_metrics[name] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}

    _say(f"sampling {settings.samples} replies per eval prompt from both models and the base, scoring them", quiet)
    t0 = time.perf_counter()
    loaded = []
    for name, path in [*((name, runs[name]) for name in MODELS), (BASE, "sfr-tiny")]:
        model, tokenizer = load_model_and_tokenizer(path, device=device)
        loaded.append((name, model, tokenizer))
    data = default_corpus_path("eval")
    torch_threads = torch.get_num_threads()
    results = evaluate_dialogue(loaded, data, samples=settings.samples, max_new_tokens=settings.max_new_tokens,
                                temperature=settings.temperature, top_p=1.0, limit=settings.limit,
                                seed=settings.seed, heldout_nll=True, backend="transformers", progress=progress)
    timings["eval_s"] = round(time.perf_counter() - t0, 2)
    compare = comparisons(results, settings.bootstrap_resamples, settings.seed)
    intervals = model_intervals(results, settings.bootstrap_resamples, settings.seed)

    diagnose_summary = None
    if settings.diagnose:
        from sfr.diagnostics import DiagnoseConfig, diagnose

        _say("Lock/Fork diagnostics of the SFR model", quiet)
        t0 = time.perf_counter()
        diagnose_summary = diagnose(DiagnoseConfig(model=str(runs["SFR"]), data=str(data), out=str(out / "diagnose"),
                                                   limit=settings.diagnose_limit, seed=settings.seed,
                                                   device=device), progress=progress)
        timings["diagnose_s"] = round(time.perf_counter() - t0, 2)
    timings["total_s"] = round(time.perf_counter() - started, 2)

    histories = {name: _log_history(runs[name]) for name in MODELS}
    results.update(
        demo={**asdict(settings), "device": device_description(device), "torch_threads": torch_threads,
              "runs": {name: str(path) for name, path in runs.items()}},
        training=train_metrics, timings=timings, comparison=compare, intervals=intervals,
        diagnose=None if diagnose_summary is None else {
            **{k: diagnose_summary[k] for k in ("anchors", "mean_fork_score", "median_fork_score",
                                                "mean_endpoint_norm", "source_norm", "score_spread", "score_noise",
                                                "below_noise", "noise_note", "files")},
            "num_draws": diagnose_summary["config"]["num_draws"]})
    table = demo_table(results, compare)

    rows = {name: {k: v for k, v in results["models"][name].items() if k != "per_prompt"}
            for name in (*MODELS, BASE)}
    errors = {name: {key: (s["low"], s["high"]) for key, s in stats.items() if not math.isnan(s["low"])}
              for name, stats in intervals.items()}
    note = ("error bars: 95 % bootstrap interval over prompts (cross-style: over questions) of one training run; "
            "base = the untrained sfr-tiny")
    files = {}
    for group, title in (("diversity", "Diversity (within a prompt's samples; cross-style: across personas)"),
                         ("style", "Style fidelity and mode coverage"), ("quality", "Quality proxies")):
        columns = dialogue_columns(rows, groups=[group, "cross-style"] if group == "diversity" else [group])
        plot_rows = dict(rows)
        corpus = results.get("corpus") or {}
        if any(key in corpus for key, _ in columns):  # the corpus' known values as a target bar
            plot_rows["corpus (known)"] = corpus
        if bar_plots(plot_rows, columns, out / f"{group}.png", f"sfr demo: {title}", errors, note) is not None:
            files[f"{group}.png"] = str(out / f"{group}.png")
    files["loss.png"] = str(plot_losses(histories, out / "loss.png"))
    (out / "samples.json").write_text(json.dumps(results.pop("samples"), indent=1, ensure_ascii=False))
    files["samples.json"] = str(out / "samples.json")
    results["files"] = files
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    files["results.json"] = str(out / "results.json")
    report = render_demo_report(results, table, json.loads((out / "samples.json").read_text()))
    (out / "report.md").write_text(report)
    files["report.md"] = str(out / "report.md")
    print(table)  # the table is the demo's answer: printed even when quiet
    print(f"wrote {out / 'report.md'} (total {timings['total_s']:.0f} s on {results['demo']['device']})")
    return {**results, "table": table, "files": files}
