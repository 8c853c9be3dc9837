"""``sfr study``: Cross-Style Collapse on the embedded tiny LM: SFT vs SFR vs MTP across training seeds.

The setting (docs/study.md says why this one; plain SFT on the embedded default does not collapse):

1. **Base stage** (:func:`train_base`, once, seed 0, cached under ``<sfr cache>/study/``): the embedded
   tiny LM (``sfr-tiny``, random init) trained with plain CE on *un-styled*, diverse replies
   (:func:`sfr.corpus.build_base_corpus`: every prompt ``base_examples_per_prompt`` times, modes at the
   known frequencies, the system prompt cycling over a neutral one and the 9 persona prompts). It is the
   "pretrained" model every fine-tune starts from: coherent under a persona prompt, not following it.
2. **Fine-tunes** (:func:`run_cell`): from the base, on the train split with one reply per (persona,
   prompt) pair whose mode is *drawn* from the known frequencies (``build_corpus(examples_per_pair=1,
   allocation="drawn")``, 72 examples), for every cell (objective and settings) and every training
   seed, at equal budget (same steps, batch, learning rate, data order per seed; the ``sfr train``
   defaults for the tiny model otherwise: phase A 20 %, ramp 30 %, M = 4, sigma = 1, lambda_max = 1).
3. **Evaluation** (:func:`evaluate_model`), the same for every model, with the same sampling seed:
   ``samples`` replies to every (persona, prompt) pair of the first ``prompts`` corpus prompts x the 9
   personas, scored by :func:`sfr.eval.dialogue.score_replies` (within-pair diversity, style, mode
   statistics, valid-reply and on-topic rates) and :func:`sfr.eval.cross_style.score_cross_style`
   (per prompt over the 9 personas); held-out NLL of the eval split's references. The corpus' own
   generative process and the base model are scored the same way (reference rows).

Training seeds are the unit of replication: :mod:`sfr.study_report` gives every metric's mean and 95 %
t interval across seeds, and the seed-paired difference to SFT. Results: ``DIR/results.json``,
``DIR/report.md``, ``DIR/metrics.png``, ``DIR/vs_sft.png``; every finished (cell, seed) is kept in
``DIR/runs/<cell>-s<seed>/run.json`` and reused when the study is run again with the same settings.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sfr.checks import check_int
from sfr.eval.cross_style import CROSS_STYLE_METRICS

# The within-pair metrics of sfr.eval.dialogue.score_replies the study reports (cross-style ones are added).
PAIR_METRICS = ("mode_entropy", "mode_coverage", "mode_total_variation", "self_bleu", "distinct_2",
                "embedding_diversity", "style_accuracy", "style_marker_rate", "valid_reply_rate", "on_topic_rate")
STUDY_METRICS = CROSS_STYLE_METRICS + PAIR_METRICS + ("heldout_nll",)


@dataclass(frozen=True)
class Cell:
    """One training setting: ``name``, the objective, :class:`~sfr.training_args.SFRTrainingArguments`
    overrides, and the sampling temperatures its models are scored at (a result row each; the first is
    the row named ``name``, another ``T`` is the row ``name-T<T>``). ``control``: a reference row that
    keeps a diversity gain from reading as a win, not an objective under test."""

    name: str
    objective: str
    overrides: dict = field(default_factory=dict)
    temperatures: tuple[float, ...] = (1.0,)
    control: bool = False

    def row_name(self, temperature: float) -> str:
        return self.name if temperature == self.temperatures[0] else f"{self.name}-T{temperature:g}"


OBJECTIVE_CELLS = (Cell("sft", "sft"), Cell("sfr", "sfr"), Cell("mtp", "mtp"))
SQRT_E = {"target_scale": "sqrt_e"}
# The full study adds: SFT sampled hotter, SFR and MTP with the targets scaled by sqrt(E) (the only
# setting that makes SFR's backbone gradient depend on the future, docs/study.md) and the strongest SFR
# setting measured (sqrt(E), lambda_max 10). The temperature and lambda 10 rows are controls that keep a
# diversity gain from reading as a win: do they move along the same diversity-fidelity trade-off?
FULL_CELLS = (Cell("sft", "sft", temperatures=(1.0, 1.1)), Cell("sfr", "sfr"), Cell("mtp", "mtp"),
              Cell("sfr-sqrtE", "sfr", SQRT_E), Cell("mtp-sqrtE", "mtp", SQRT_E),
              Cell("sfr-sqrtE-lam10", "sfr", {**SQRT_E, "lambda_max": 10.0}, control=True))
# The calibration grid (sfr study --grid calibration, docs/study.md): which SFR setting, if any, does
# more than the defaults? Each cell changes one thing: the gradient's weight (lambda_max), the source's
# scale instead of the targets' (sigma = 1/sqrt(E) for MiniLM's E = 384), the draws per anchor (M), the
# head-only phase, and the EMA teacher's online targets instead of the frozen encoder's.
CALIBRATION_CELLS = (FULL_CELLS[0], Cell("sfr-lam10", "sfr", {"lambda_max": 10.0}),
                     Cell("sfr-sqrtE-lam3", "sfr", {**SQRT_E, "lambda_max": 3.0}),
                     Cell("sfr-sigma0.051", "sfr", {"source_std": 384 ** -0.5}),
                     Cell("sfr-sqrtE-M1", "sfr", {**SQRT_E, "num_samples": 1}),
                     Cell("sfr-sqrtE-M16", "sfr", {**SQRT_E, "num_samples": 16}),
                     Cell("sfr-sqrtE-nophaseA", "sfr", {**SQRT_E, "phase_a_steps": 0, "ramp_steps": 0}),
                     Cell("sfr-ema", "sfr", {"target_source": "ema", "ema_decay": 0.99}),
                     Cell("sfr-ema-sqrtE", "sfr", {**SQRT_E, "target_source": "ema", "ema_decay": 0.99}))
GRIDS = {"objectives": FULL_CELLS, "calibration": CALIBRATION_CELLS}


@dataclass
class StudySettings:
    """Everything that decides a study's numbers (see :data:`FULL`, :data:`QUICK`); ``jobs`` only
    decides how many runs train at once (each in its own process with 1 torch thread)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # docs/study.md: 3 seeds left the lambda=3 intervals too wide
    base_steps: int = 600
    base_examples_per_prompt: int = 200
    base_batch_size: int = 16
    steps: int = 400
    batch_size: int = 8
    learning_rate: float = 1e-3
    examples_per_pair: int = 1
    allocation: str = "drawn"
    samples: int = 8
    max_new_tokens: int = 32
    sampling_seed: int = 1234
    prompts: int | None = None  # the first N corpus prompts (all 10 when None), each under all 9 personas
    classifier_examples: int = 6  # corpus replies per pair the persona classifier is trained on
    cells: tuple[Cell, ...] = FULL_CELLS
    jobs: int = 1
    quick: bool = False


FULL = StudySettings()
QUICK = StudySettings(seeds=(0, 1), base_steps=40, base_examples_per_prompt=20, steps=30, samples=3,
                      max_new_tokens=20, prompts=2, classifier_examples=3, cells=OBJECTIVE_CELLS, quick=True)


def study_settings(quick: bool = False, grid: str | None = None, **overrides) -> StudySettings:
    """The full (or ``--quick``) settings with ``overrides`` (``None`` values are ignored), checked;
    ``grid`` names the cells (:data:`GRIDS`: ``objectives``, the default, or ``calibration``)."""
    base = asdict(QUICK if quick else FULL)
    base["cells"] = (QUICK if quick else FULL).cells  # asdict would turn the cells into dicts
    if grid is not None:
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {sorted(GRIDS)}, got {grid!r}")
        if grid != "objectives" or not quick:  # --quick keeps its three objective cells
            base["cells"] = GRIDS[grid]
    base.update({k: v for k, v in overrides.items() if v is not None})
    settings = StudySettings(**base)
    settings.seeds = tuple(settings.seeds)
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise ValueError(f"seeds must be distinct training seeds, at least one, got {list(settings.seeds)}")
    for name in ("base_steps", "base_examples_per_prompt", "base_batch_size", "steps", "batch_size",
                 "examples_per_pair", "max_new_tokens", "classifier_examples", "jobs"):
        check_int(name, getattr(settings, name))
    check_int("samples", settings.samples, 2, why=" (within-pair diversity needs several replies)")
    check_int("prompts", settings.prompts, optional=True)
    from sfr.corpus import ALLOCATIONS, PROMPTS

    if settings.prompts is not None and settings.prompts > len(PROMPTS):
        raise ValueError(f"prompts must be at most {len(PROMPTS)} (the corpus' prompts), got {settings.prompts}")
    if settings.allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {settings.allocation!r}")
    if not settings.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {settings.learning_rate!r}")
    if "sft" not in {cell.name for cell in settings.cells}:
        raise ValueError("the cells must include 'sft' (every difference is taken against it)")
    return settings


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[sfr study] {message}", file=sys.stderr, flush=True)


def _fingerprint(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _training_arguments(output_dir, objective: str, steps: int, seed: int, batch_size: int, learning_rate: float,
                        **overrides):
    from sfr.training_args import SFRTrainingArguments

    return SFRTrainingArguments.for_embedded_default(  # warm-up, phase A and ramp scale with max_steps
        output_dir=str(output_dir), objective=objective, max_steps=steps, seed=seed, data_seed=seed,
        learning_rate=learning_rate, per_device_train_batch_size=batch_size, logging_steps=max(1, steps // 20),
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, overwrite_output_dir=True, **overrides)


# ---- data and the base stage ---------------------------------------------------------------------------
def base_settings(settings: StudySettings) -> dict:
    from sfr.corpus import CORPUS_VERSION
    from sfr.tiny_lm import MODEL_VERSION

    return {"model": f"sfr-tiny-{MODEL_VERSION}", "corpus": CORPUS_VERSION, "seed": 0,
            "steps": settings.base_steps, "batch_size": settings.base_batch_size,
            "examples_per_prompt": settings.base_examples_per_prompt, "learning_rate": settings.learning_rate}


def prepared_data(records) -> str:
    """The directory of ``records`` prepared for training (:func:`sfr.targets.prepare`, cached)."""
    from sfr.targets import prepare

    return str(prepare(records, progress=False).path)


def train_base(settings: StudySettings, progress: bool = False) -> Path:
    """The base model's directory (trained on first use, then cached under ``<sfr cache>/study/``)."""
    from sfr.corpus import build_base_corpus, build_cached, sfr_cache_dir
    from sfr.train import train

    config = base_settings(settings)

    def build(tmp: Path) -> None:
        callback, bar = _step_bar(settings.base_steps, "base stage", progress)
        started = time.perf_counter()
        with quiet_libraries():
            data = prepared_data(build_base_corpus(settings.base_examples_per_prompt))
            train(_training_arguments(tmp, "sft", settings.base_steps, 0, settings.base_batch_size,
                                      settings.learning_rate), model="sfr-tiny", data=data, callbacks=[callback])
        bar.close()
        (tmp / "study_base.json").write_text(json.dumps({**config, "train_wall_s": time.perf_counter() - started}))

    return build_cached(sfr_cache_dir() / "study" / f"base-{_fingerprint(config)}", build)


def fine_tuning_records(settings: StudySettings) -> list[dict]:
    from sfr.corpus import build_corpus

    return build_corpus("train", examples_per_pair=settings.examples_per_pair, allocation=settings.allocation)


# ---- evaluation ---------------------------------------------------------------------------------------------
def study_prompts(settings: StudySettings):
    """Every persona x the first ``prompts`` corpus prompts, as :class:`~sfr.eval.dialogue.DialoguePrompt`;
    references = ``classifier_examples`` replies of the corpus' process (what the persona classifier learns)."""
    from sfr.corpus import PERSONAS, PROMPT_ORDER, PROMPTS, draw_replies
    from sfr.eval.dialogue import DialoguePrompt

    prompts = []
    for prompt_id in PROMPT_ORDER[:settings.prompts]:
        for persona, spec in PERSONAS.items():
            rng = random.Random(f"sfr-study-classifier-{persona}-{prompt_id}")
            references = [reply for _, reply in draw_replies(persona, prompt_id, settings.classifier_examples, rng)]
            messages = [{"role": "system", "content": spec.system_prompt},
                        {"role": "user", "content": PROMPTS[prompt_id].user_text}]
            prompts.append(DialoguePrompt(messages, references, persona, prompt_id))
    return prompts


class Scorer:
    """Scores one model's replies to :func:`study_prompts` (the encoder and classifier are loaded once)."""

    def __init__(self, settings: StudySettings):
        from sfr.eval.dialogue import fit_persona_classifier, load_encoder

        self.prompts = study_prompts(settings)
        self.encoder = load_encoder(None, device="cpu")
        self.classifier, self.labels = fit_persona_classifier(self.prompts, self.encoder)

    def __call__(self, replies, heldout_nll: float | None = None) -> dict:
        """``{"metrics": {name: value}, "per_pair": {...}, "cross_style": {...}}``."""
        from sfr.eval.cross_style import score_cross_style
        from sfr.eval.dialogue import score_replies

        scored = score_replies(self.prompts, replies, self.encoder, self.classifier, self.labels)
        cross = score_cross_style(self.prompts, replies, self.encoder)
        metrics = {name: scored[name] for name in PAIR_METRICS}
        metrics.update({name: cross[name] for name in CROSS_STYLE_METRICS}, heldout_nll=heldout_nll)
        pairs = [f"{p.persona}|{p.prompt_id}" for p in self.prompts]
        per_pair = {"pairs": pairs, **{name: scored["per_prompt"][name] for name in PAIR_METRICS}}
        return {"metrics": metrics, "per_pair": per_pair, "cross_style": cross["cross_style"]}


def heldout_nll(model, tokenizer) -> float:
    """Mean NLL/token of the eval split's reference replies (18 held-out pairs x 10)."""
    from sfr.corpus import build_corpus
    from sfr.eval.dialogue import reply_nll

    records = build_corpus("eval")
    total, count = reply_nll(model, tokenizer, [r["messages"][:-1] for r in records],
                             [r["messages"][-1]["content"] for r in records], batch_size=64)
    return total / count


def evaluate_model(model_dir, settings: StudySettings, scorer: Scorer, temperatures=(1.0,)) -> list[dict]:
    """One scored result (:meth:`Scorer.__call__` plus ``"temperature"``, ``"eval_s"``) per temperature."""
    from sfr.eval.generation import sample
    from sfr.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir)
    nll = heldout_nll(model, tokenizer)
    results = []
    for temperature in temperatures:
        started = time.perf_counter()
        replies = sample(model, tokenizer, [p.messages for p in scorer.prompts], n=settings.samples,
                         temperature=temperature, max_new_tokens=settings.max_new_tokens, batch_size=72,
                         seed=settings.sampling_seed, backend="transformers", progress=False)
        replies = [[reply.strip() for reply in group] for group in replies]
        result = scorer(replies, nll)
        result.update(temperature=temperature, eval_s=round(time.perf_counter() - started, 2),
                      examples={pair: group[:3] for pair, group in zip(result["per_pair"]["pairs"][:3], replies)})
        results.append(result)
    return results


def corpus_replies(settings: StudySettings, scorer: Scorer) -> list[list[str]]:
    """``samples`` replies per pair drawn from the corpus' own process (its finite-sample metric values)."""
    from sfr.corpus import draw_replies

    return [[reply for _, reply in draw_replies(p.persona, p.prompt_id, settings.samples,
                                                random.Random(f"sfr-study-corpus-{p.persona}-{p.prompt_id}"))]
            for p in scorer.prompts]


# ---- one (cell, seed) ---------------------------------------------------------------------------------------
def run_settings(settings: StudySettings, cell: Cell, seed: int) -> dict:
    """What decides the numbers of one (cell, seed): recorded with its rows, and the key of its reuse."""
    keep = ("steps", "batch_size", "learning_rate", "examples_per_pair", "allocation", "samples", "max_new_tokens",
            "sampling_seed", "prompts", "classifier_examples")
    return {"objective": cell.objective, "seed": seed, **cell.overrides, "temperatures": list(cell.temperatures),
            **{k: getattr(settings, k) for k in keep}, "base": base_settings(settings)}


def run_cell(settings: StudySettings, cell: Cell, seed: int, base_dir, data_dir, out_dir) -> list[dict]:
    """Fine-tune the base with ``cell`` and ``seed``, evaluate it; the result rows (one per temperature),
    also written to ``out_dir/run.json`` (and read back from there when its settings are the same)."""
    import torch

    from sfr.train import train

    out_dir = Path(out_dir)
    recorded = run_settings(settings, cell, seed)
    saved = out_dir / "run.json"
    if saved.is_file():
        rows = json.loads(saved.read_text())
        if rows and all(row["settings"] == json.loads(json.dumps(recorded)) for row in rows):
            return [{**row, "reused": True} for row in rows]  # the report counts them apart
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's steps are overhead-bound: threads only fight over the cores
    try:
        started = time.perf_counter()
        args = _training_arguments(out_dir / "model", cell.objective, settings.steps, seed, settings.batch_size,
                                   settings.learning_rate, **cell.overrides)
        result = train(args, model=str(base_dir), data=str(data_dir))
        train_s = round(time.perf_counter() - started, 2)
        evaluated = evaluate_model(out_dir / "model", settings, Scorer(settings), cell.temperatures)
    finally:
        torch.set_num_threads(threads)
    final = {k: v for k, v in result.metrics.items() if k.startswith("final_")}
    rows = [{"name": cell.row_name(e["temperature"]), "cell": cell.name, "objective": cell.objective, "seed": seed,
             "control": cell.control or e["temperature"] != cell.temperatures[0], "settings": recorded,
             "temperature": e["temperature"], "metrics": e["metrics"], "per_pair": e["per_pair"],
             "cross_style": e["cross_style"], "examples": e["examples"],
             "timings": {"train_s": train_s, "eval_s": e["eval_s"]}, "training": final} for e in evaluated]
    saved.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return rows


@contextlib.contextmanager
def quiet_libraries():
    """Silence what the libraries print while a run trains and samples (Trainer logs, loading bars,
    ``[sfr train]`` lines): the study shows its own progress. Restored afterwards."""
    import datasets
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    dataset_bars = datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if dataset_bars:
            datasets.enable_progress_bars()


def _run_cell_quietly(*args) -> list[dict]:
    """:func:`run_cell` without the libraries' output (also the function a worker process runs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with quiet_libraries():
        return run_cell(*args)


def _step_bar(total: int, desc: str, enabled: bool):
    """``(callback, bar)``: a ``TrainerCallback`` that advances a tqdm bar of ``total`` optimizer steps."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr)

    class StepBar(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bar.update(state.global_step - bar.n)

    return StepBar(), bar


# ---- the study ----------------------------------------------------------------------------------------------
def run_study(output_dir="sfr-study", settings: StudySettings | None = None, *, progress: bool = True,
              quiet: bool = False) -> dict:
    """Run the study (see the module docstring) and write its results, report and plots.

    Returns the content of ``results.json`` plus ``"files"`` (name -> path of everything written).
    """
    import torch
    from tqdm.auto import tqdm

    from sfr.demo import device_description
    from sfr.study_report import summarize, write_study_report

    settings = settings or study_settings()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    _say(f"base stage: sfr-tiny, {settings.base_steps} steps on un-styled replies (cached after the first run)", quiet)
    t0 = time.perf_counter()
    base_dir = train_base(settings, progress)
    timings["base_s"] = round(time.perf_counter() - t0, 2)
    with quiet_libraries():
        data_dir = prepared_data(fine_tuning_records(settings))

    _say("scoring the corpus' own replies and the base model (reference rows)", quiet)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_libraries():
            scorer = Scorer(settings)
            corpus_row = scorer(corpus_replies(settings, scorer))
            base_row = evaluate_model(base_dir, settings, scorer)[0]
    finally:
        torch.set_num_threads(threads)
    timings["references_s"] = round(time.perf_counter() - t0, 2)

    jobs = [(cell, seed) for seed in settings.seeds for cell in settings.cells]
    _say(f"{len(jobs)} fine-tunes ({len(settings.cells)} cells x {len(settings.seeds)} seeds, {settings.steps} steps "
         f"each) in {settings.jobs} process(es), each evaluated on {len(scorer.prompts)} pairs x {settings.samples} "
         "samples", quiet)
    t0 = time.perf_counter()
    runs = []
    bar = tqdm(total=len(jobs), desc="fine-tune + evaluate", unit="run", disable=not progress, file=sys.stderr)
    arguments = [(settings, cell, seed, base_dir, data_dir, out / "runs" / f"{cell.name}-s{seed}") for cell, seed in jobs]
    if settings.jobs == 1:
        for args in arguments:
            runs += _run_cell_quietly(*args)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(settings.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_run_cell_quietly, *args) for args in arguments]
            for future in as_completed(futures):
                future.result()  # a failed run raises here
                bar.update()
            for future in futures:  # in job order, whatever order they finished in
                runs += future.result()
    bar.close()
    timings["runs_s"] = round(time.perf_counter() - t0, 2)
    timings["total_s"] = round(time.perf_counter() - started, 2)

    results = {
        "settings": {**asdict(replace(settings, cells=())), "cells": [asdict(c) for c in settings.cells],
                     "base": base_settings(settings),
                     # names of the sfr-cache entries, not this machine's paths (results.json is shareable)
                     "base_cache_entry": Path(base_dir).name, "data_cache_entry": Path(data_dir).name,
                     "device": device_description("cpu"), "torch_threads_per_process": 1},
        "references": {"corpus": {"name": "corpus", **corpus_row}, "base": {"name": "base", **base_row}},
        "runs": runs, "timings": timings}
    results["summary"] = summarize(results)
    files = write_study_report(results, out)
    _say(f"wrote {files['report.md']} (total {timings['total_s']:.0f} s)", quiet)
    return {**results, "files": files}
