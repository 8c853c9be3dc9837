"""``sfr demo --quick`` end to end: the files, and that every number in the table is what was measured."""
import contextlib
import io
import json
import math
import re

import numpy as np
import pytest

from sfr import corpus
from sfr.demo import BASE, MODELS, QUICK, demo_settings, per_unit, run_demo
from sfr.eval import distinct_n, mode_statistics, self_bleu
from sfr.eval.dialogue import METRICS, _normalise, corpus_valid_replies, load_dialogue

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        result = run_demo(out, demo_settings(quick=True), progress=False, quiet=True)
    saved = json.loads((out / "results.json").read_text())
    samples = json.loads((out / "samples.json").read_text())
    return {"out": out, "result": result, "saved": saved, "samples": samples, "printed": printed.getvalue(),
            "errors": errors.getvalue()}


def test_writes_report_plots_and_prints_the_table(demo):
    out = demo["out"]
    for name in ("report.md", "results.json", "samples.json", "diversity.png", "style.png", "quality.png", "loss.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert path.stat().st_size > 5000, name  # a real figure, not an empty canvas
    report = (out / "report.md").read_text()
    table = demo["result"]["table"]
    assert table in report and table in demo["printed"]  # the printed table is the report's table
    for image in ("diversity.png", "style.png", "quality.png", "loss.png"):
        assert f"]({image})" in report
    assert "CPU, " in report and "--quick" in report
    assert all((out / "runs" / run / "config.json").is_file() for run in ("sft", "sfr"))
    assert (out / "runs" / "sfr" / "sfr_head").is_dir() and not (out / "runs" / "sft" / "sfr_head").exists()
    assert (out / "diagnose" / "fork_scores.html").is_file()


def test_quiet_prints_the_table_and_where_it_went_and_nothing_else(demo):
    """No per-step {'loss': ...} lines (the Trainer prints them when its bar is off), no stage lines.
    (A library may print on import, e.g. DeepSpeed's accelerator line: not counted here.)"""
    table = demo["result"]["table"]
    assert demo["printed"].endswith(table + "\n" + f"wrote {demo['out'] / 'report.md'} (total "
                                    + demo["printed"].split("(total ", 1)[1])
    ours = [line for text in (demo["printed"], demo["errors"]) for line in text.splitlines()
            if line.startswith(("{", "[sfr ", "sfr "))]
    assert ours == []  # warnings are filtered in these tests; quiet still shows them


def _prompts(saved):
    from sfr.corpus import default_corpus_path

    return load_dialogue(default_corpus_path("eval"), saved["demo"]["limit"], saved["settings"]["seed"])


def test_metrics_match_recomputation_from_the_saved_samples(demo):
    saved, samples = demo["saved"], demo["samples"]
    prompts = _prompts(saved)
    assert saved["settings"]["num_prompts"] == len(prompts) == QUICK.limit
    for name in MODELS:
        rows = samples[name]
        assert [r["messages"] for r in rows] == [p.messages for p in prompts]
        assert all(len(r["replies"]) == QUICK.samples for r in rows)
        per_prompt = saved["models"][name]["per_prompt"]
        expected = {key: [] for key in ("distinct_1", "distinct_2", "self_bleu", "style_marker_rate", "mode_coverage",
                                        "mode_entropy", "mode_total_variation", "valid_reply_rate", "on_topic_rate")}
        for prompt, row in zip(prompts, rows):
            replies = row["replies"]
            expected["distinct_1"].append(distinct_n(replies, 1))
            expected["distinct_2"].append(distinct_n(replies, 2))
            expected["self_bleu"].append(self_bleu(replies))
            expected["style_marker_rate"].append(np.mean([corpus.has_style_marker(prompt.persona, r) for r in replies]))
            stats = mode_statistics([corpus.classify_mode(prompt.prompt_id, r) for r in replies],
                                    corpus.mode_frequencies(prompt.prompt_id))
            expected["mode_coverage"].append(stats["coverage"])
            expected["mode_entropy"].append(stats["entropy"])
            expected["mode_total_variation"].append(stats["total_variation"])
            expected["on_topic_rate"].append(1 - stats["unclassified_rate"])
            valid = corpus_valid_replies(prompt.persona, prompt.prompt_id)
            expected["valid_reply_rate"].append(np.mean([_normalise(r) in valid for r in replies]))
        for key, values in expected.items():
            assert per_prompt[key] == pytest.approx(values, abs=1e-12), (name, key)
            assert saved["models"][name][key] == pytest.approx(np.mean(values), abs=1e-12), (name, key)
        for key, value in saved["models"][name].items():  # every metric is in its range
            if key in ("per_prompt", "cross_style", "backend", "language_warnings") or value is None:
                continue
            low, high = {"self_bleu": (0, 100), "cross_style_self_bleu": (0, 100), "cross_style_self_bleu_content": (0, 100),
                         "pooled_mode_entropy": (0, math.log(3) + 1e-9), "cross_style_similarity": (-1, 1),
                         "embedding_diversity": (0, 2), "mode_entropy": (0, math.log(3) + 1e-9),
                         "heldout_nll": (0, 20), "mean_reply_words": (0, 1000)}.get(key, (0, 1))
            assert low <= value <= high, (name, key, value)


def test_embedding_diversity_and_style_accuracy_are_recomputable(demo):
    from sfr.eval.dialogue import fit_persona_classifier, load_encoder
    from sfr.eval.metrics import embedding_diversity

    saved, samples = demo["saved"], demo["samples"]
    prompts = _prompts(saved)
    encoder = load_encoder(None, device="cpu")
    classifier, labels = fit_persona_classifier(prompts, encoder)
    for name in MODELS:
        replies = samples[name][0]["replies"]
        embeddings = encoder.encode(replies, normalize_embeddings=True)
        assert saved["models"][name]["per_prompt"]["embedding_diversity"][0] == pytest.approx(
            embedding_diversity(embeddings), abs=1e-5)
        hits = classifier.predict(np.asarray(embeddings, dtype=np.float64)) == labels[prompts[0].system]
        assert saved["models"][name]["per_prompt"]["style_accuracy"][0] == pytest.approx(hits.mean())


def test_heldout_nll_is_each_models_own_and_models_differ_as_they_really_do(demo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfr.eval.dialogue import reply_nll

    saved = demo["saved"]
    prompt = _prompts(saved)[1]
    weights, nll = {}, {}
    for name in MODELS:
        run = saved["demo"]["runs"][name]
        model, tokenizer = AutoModelForCausalLM.from_pretrained(run).eval(), AutoTokenizer.from_pretrained(run)
        weights[name] = model.state_dict()
        total, count = reply_nll(model, tokenizer, [prompt.messages] * len(prompt.references), prompt.references)
        nll[name] = total / count
        assert saved["models"][name]["per_prompt"]["heldout_nll"][1] == pytest.approx(nll[name], rel=1e-5)
    weights_differ = any(not torch.equal(weights["SFT"][k], weights["SFR"][k]) for k in weights["SFT"])
    samples_differ = demo["samples"]["SFT"] != demo["samples"]["SFR"]
    # SFR's gradient reaches the backbone after phase A, so the two fine-tuned models are different models
    assert weights_differ and (nll["SFT"] != nll["SFR"])
    # identical samples would have to give identical diversity numbers, different ones may not
    if not samples_differ:
        for key in ("distinct_1", "self_bleu"):
            assert saved["models"]["SFT"][key] == saved["models"]["SFR"][key]


def _table_rows(table: str) -> dict:
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_table_shows_the_saved_numbers_and_the_paired_differences(demo):
    from sfr.eval.report import format_value

    saved = demo["saved"]
    rows = _table_rows(demo["result"]["table"])
    labels = {label: key for key, (label, _, _) in METRICS.items()}
    assert len(rows) >= 10
    for label, cells in rows.items():
        key = labels[label]
        assert cells[2] == format_value(saved["models"]["SFT"][key]) and cells[3] == format_value(saved["models"]["SFR"][key])
        assert cells[6] == format_value(saved["models"][BASE][key])  # the untrained model, scored the same way
        pairs = [(a, b) for a, b in zip(per_unit(saved["models"]["SFT"], key), per_unit(saved["models"]["SFR"], key))
                 if a is not None and b is not None]
        diff = np.mean([b - a for a, b in pairs])
        assert saved["comparison"][key]["diff"] == pytest.approx(diff, abs=1e-12)
        shown = re.match(r"([+-][0-9.e+-]+)", cells[4]).group(1)
        assert float(shown) == pytest.approx(diff, rel=1e-2, abs=1e-9)
        low, high = saved["comparison"][key]["low"], saved["comparison"][key]["high"]
        assert low - 1e-12 <= diff <= high + 1e-12
    corpus_row = saved["corpus"]
    assert rows["mode entropy (nats)"][5] == format_value(corpus_row["mode_entropy"])
    expected_entropy = np.mean([-sum(p * math.log(p) for p in corpus.mode_frequencies(q.prompt_id).values() if p > 0)
                                for q in _prompts(saved)])
    assert corpus_row["mode_entropy"] == pytest.approx(expected_entropy)


def test_same_budget_and_seed_and_loss_curves_from_trainer_state(demo):
    import torch

    saved = demo["saved"]
    runs = {name: saved["demo"]["runs"][name] for name in MODELS}
    args = {name: torch.load(f"{run}/training_args.bin", weights_only=False) for name, run in runs.items()}
    assert args["SFT"].objective == "sft" and args["SFR"].objective == "sfr"
    for field in ("max_steps", "seed", "data_seed", "learning_rate", "per_device_train_batch_size", "lr_scheduler_type",
                  "warmup_steps", "gradient_accumulation_steps", "weight_decay"):
        assert getattr(args["SFT"], field) == getattr(args["SFR"], field), field
    assert args["SFR"].max_steps == QUICK.max_steps and args["SFR"].seed == QUICK.seed
    for name, run in runs.items():
        history = json.loads(open(f"{run}/trainer_state.json").read())["log_history"]
        logged = [h for h in history if "ce_loss" in h]
        assert logged[-1]["step"] == QUICK.max_steps
        assert saved["training"][name]["final_ce_loss"] == pytest.approx(logged[-1]["ce_loss"])
        assert logged[-1]["ce_loss"] < logged[0]["ce_loss"]  # training did something
        assert ("sfr_loss" in logged[-1]) == (name == "SFR")
    lambdas = [h["sfr_lambda"] for h in json.loads(open(f"{runs['SFR']}/trainer_state.json").read())["log_history"]
               if "sfr_lambda" in h]
    assert lambdas[0] == 0.0 and lambdas[-1] == pytest.approx(args["SFR"].lambda_max)


def test_diagnostics_of_the_sfr_run(demo):
    saved = demo["saved"]
    report = json.loads((demo["out"] / "diagnose" / "fork_scores.json").read_text())
    scores = [s for ex in report["examples"] for s in ex["fork_scores"]]
    assert saved["diagnose"]["anchors"] == len(scores) > 0
    assert saved["diagnose"]["mean_fork_score"] == pytest.approx(np.mean(scores))
    assert all(0.0 <= s <= 2.0 for s in scores)


def test_cli_help_and_bad_input(capsys, tmp_path):
    from sfr.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--quick", "--output-dir", "--max-steps", "--seed", "--samples", "--limit"):
        assert flag in text
    import argparse

    from sfr.commands.demo import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {action.option_strings[0]: action.help for action in parser._actions if action.option_strings}
    assert f"{QUICK.max_new_tokens} new tokens per reply" in helps["--quick"]  # everything --quick changes
    assert f"diagnostics on {QUICK.diagnose_limit} examples" in helps["--quick"]
    undocumented = [action.option_strings[0] for action in parser._actions
                    if action.option_strings and action.nargs != 0 and "default" not in action.help]
    assert undocumented == []  # every option that takes a value states its default
    assert main(["demo", "--quick", "--samples", "1", "--output-dir", str(tmp_path / "x")]) == 2
    assert "samples must be an int >= 2" in capsys.readouterr().err
    assert main(["demo", "--max-steps", "0", "--output-dir", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # failed before writing anything
    assert "max_steps must be an int >= 1" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "x"):  # checked before training: a one-line error naming the argument
        assert main(["demo", "--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sfr demo: error: --output-dir {out}") and "\n" not in err, err
    with pytest.raises(ValueError, match="device"):
        demo_settings(device="tpu")


def test_verdicts_follow_the_intervals_and_directions():
    from sfr.demo import comparisons, demo_table
    from sfr.eval.report import verdict_summary

    def models(sft, sfr):
        return {"SFT": {"per_prompt": sft, **{k: float(np.mean(v)) for k, v in sft.items()}},
                "SFR": {"per_prompt": sfr, **{k: float(np.mean(v)) for k, v in sfr.items()}}}

    n = 12
    base = [0.5 + 0.01 * i for i in range(n)]
    sft = {"distinct_1": base, "self_bleu": [50.0 + i for i in range(n)], "embedding_diversity": base,
           "mode_entropy": [0.5] * n, "style_marker_rate": base}
    sfr = {"distinct_1": [v + 0.1 for v in base],  # clearly higher, higher is better -> SFR
           "self_bleu": [55.0 + i for i in range(n)],  # clearly higher, lower is better -> SFT
           "embedding_diversity": [v + (0.05 if i % 2 else -0.05) for i, v in enumerate(base)],  # noise -> tie
           "mode_entropy": [0.9] * n,  # closer to the corpus' 0.95 -> SFR
           "style_marker_rate": list(base)}  # identical -> tie
    results = {"models": models(sft, sfr), "corpus": {"mode_entropy": 0.95}}
    compare = comparisons(results, resamples=500)
    assert {k: compare[k]["verdict"] for k in compare} == {
        "distinct_1": "SFR", "self_bleu": "SFT", "embedding_diversity": "tie", "mode_entropy": "SFR",
        "style_marker_rate": "tie"}
    assert compare["distinct_1"]["diff"] == pytest.approx(0.1)
    summary = "\n".join(verdict_summary(compare))
    assert "SFR better on distinct-1" in summary and "SFT better on self-BLEU" in summary
    table = demo_table(results, compare)
    assert "| distinct-1 | ↑ | 0.555 | 0.655 | +0.1 [+0.1, +0.1] |  |" in table
    assert "| mode entropy (nats) | → corpus | 0.5 | 0.9 | +0.4 [+0.4, +0.4] | 0.95 |" in table


def test_plot_intervals_are_each_models_bootstrap_over_prompts(demo):
    from sfr.eval.metrics import bootstrap_interval

    saved = demo["saved"]
    assert set(saved["intervals"]) == {*MODELS, BASE}
    for name, stats in saved["intervals"].items():
        for key in ("self_bleu", "style_accuracy", "heldout_nll"):
            values = saved["models"][name]["per_prompt"][key]
            assert stats[key]["mean"] == pytest.approx(saved["models"][name][key])
            assert stats[key] == bootstrap_interval(values, QUICK.bootstrap_resamples, seed=QUICK.seed)
            assert stats[key]["low"] <= stats[key]["mean"] <= stats[key]["high"]
    base = saved["models"][BASE]
    assert base["language_warnings"] and base["valid_reply_rate"] == 0.0  # random weights: not language
    assert "bootstrap interval over prompts" in (demo["out"] / "report.md").read_text()
