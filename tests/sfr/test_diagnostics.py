import pytest
import torch

from sfr import FlowHead, sfr_loss
from sfr.diagnostics import (
    dispersion_standard_error,
    fork_scores,
    fork_statistics,
    noise_verdict,
    pairwise_cosine_dispersion,
    render_html,
)


def test_dispersion_matches_brute_force():
    x = torch.randn(3, 5, 7)
    unit = torch.nn.functional.normalize(x, dim=-1)
    for n in range(3):
        cos = unit[n] @ unit[n].T
        brute = 1 - (cos.sum() - cos.diag().sum()) / (5 * 4)
        assert torch.allclose(pairwise_cosine_dispersion(x)[n], brute, atol=1e-6)
    same = torch.randn(1, 1, 7).expand(1, 4, 7)
    assert pairwise_cosine_dispersion(same).abs().max() < 1e-6  # identical endpoints: locked
    for seed in range(10):  # ... and never below 0 (unclamped float32 round-off gives -1.2e-7 for seed 0)
        draw = torch.randn(1, 1, 384, generator=torch.Generator().manual_seed(seed)).expand(1, 4, 384)
        assert pairwise_cosine_dispersion(draw).min() >= 0.0
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_cosine_dispersion(torch.randn(2, 1, 7))


def test_fork_scores_separate_locked_from_forked_futures():
    torch.manual_seed(0)
    D, E = 16, 8
    head = FlowHead(D, E, width=64)
    h = torch.randn(2, D)  # context 0: one future; context 1: two opposite futures
    y_lock = torch.nn.functional.normalize(torch.randn(E), dim=0)
    y_fork = torch.nn.functional.normalize(torch.randn(2, E), dim=-1)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for step in range(400):
        target = torch.stack([y_lock, y_fork[step % 2]])
        loss = sfr_loss(h, target, head, num_samples=8, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = fork_scores(head, h, num_draws=32, steps=16)
    assert scores.shape == (2,)
    assert scores[1] > scores[0] + 0.2, scores


def test_the_standard_error_is_the_spread_of_the_score_over_fresh_draws():
    """Against Monte Carlo: the score's standard deviation over 4000 independent sets of S draws, for
    isotropic draws (an untrained head) and for draws from two modes (a fork)."""
    gen = torch.Generator().manual_seed(0)
    for s, e in ((16, 32), (16, 384), (8, 16)):
        isotropic = torch.randn(4000, s, e, generator=gen)
        modes = torch.randn(2, e, generator=gen)
        pick = (torch.rand(4000, s, generator=gen) < 0.3).long()
        forked = modes[pick] + 0.5 * torch.randn(4000, s, e, generator=gen)
        for draws in (isotropic, forked):
            observed = float(pairwise_cosine_dispersion(draws).double().std())
            estimated = float(dispersion_standard_error(draws).double().pow(2).mean().sqrt())
            assert estimated == pytest.approx(observed, rel=0.08), (s, e, observed, estimated)
    assert dispersion_standard_error(torch.randn(5, 3, 8)).isnan().all()  # < 4 draws: unknown
    same = torch.randn(1, 1, 8).expand(2, 6, 8)
    assert dispersion_standard_error(same).abs().max() < 1e-6  # one direction: no noise


def test_noise_verdict_tells_noise_from_structure():
    torch.manual_seed(0)
    D, E = 16, 8
    untrained = FlowHead(D, E, width=64)
    h = torch.randn(64, D)
    stats = fork_statistics(untrained, h, num_draws=16, steps=8)
    verdict = noise_verdict(stats["fork_score"], stats["standard_error"])
    assert verdict["below_noise"] is True and verdict["spread"] < 2 * verdict["noise"]
    # half the positions locked (identical scores 0 +- 0), half at 1: far above the noise
    scores = torch.cat([torch.zeros(32), stats["fork_score"][:32]])
    errors = torch.cat([torch.zeros(32), stats["standard_error"][:32]])
    assert noise_verdict(scores, errors)["below_noise"] is False
    assert noise_verdict(scores, torch.full((64,), float("nan")))["below_noise"] is None  # S < 4: unknown


def test_html_colours_on_a_fixed_scale_and_shows_the_note():
    page = render_html([{"index": 0, "tokens": ["<a>", "b", "c", "d"], "positions": [0, 1, 2],
                         "fork_scores": [0.1, 0.4, 1.3], "standard_errors": [0.01, None, 0.02]}])
    assert "&lt;a&gt;" in page and '<span style="color:#888">&lt;a&gt;</span>' in page  # context: no score
    # token t is coloured by the score of position t - 1, on the fixed 0..1 scale (not the page's min..max)
    assert '<span title="fork 0.100 ± 0.010" style="background: rgba(220,40,40,0.10)">b</span>' in page
    assert '<span title="fork 0.400" style="background: rgba(220,40,40,0.40)">c</span>' in page
    assert '<span title="fork 1.300 ± 0.020" style="background: rgba(220,40,40,1.00)">d</span>' in page
    # the page: scores 0.990 .. 1.011 are all (nearly) full red, not white-to-red
    narrow = render_html([{"index": 0, "tokens": ["a", "b", "c"], "positions": [0, 1], "fork_scores": [0.99, 1.011]}],
                         note="the differences are mostly noise")
    assert "rgba(220,40,40,0.99)" in narrow and "rgba(220,40,40,1.00)" in narrow and "rgba(220,40,40,0.00)\">b" not in narrow
    assert "<b>Note:</b> the differences are mostly noise." in narrow and "Note:" not in page


# ---- on a real `sfr train` output directory ------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of `sfr train` (SFR objective) on the embedded default: a real output directory."""
    from sfr.train import train
    from sfr.training_args import SFRTrainingArguments

    out = tmp_path_factory.mktemp("sfr-run")
    args = SFRTrainingArguments.for_embedded_default(output_dir=str(out), objective="sfr", max_steps=6, phase_a_steps=2,
                                                     ramp_steps=2, warmup_steps=0, logging_steps=2,
                                                     save_strategy="no", report_to=[], disable_tqdm=True,
                                                     use_cpu=True)
    train(args)
    return out


@pytest.fixture(scope="module")
def eval_data():
    from sfr.corpus import default_corpus_path

    return default_corpus_path("eval")


def test_diagnose_cli_on_a_trained_model(trained, eval_data, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfr.cli import main
    from sfr.data import load_records, tokenize_example
    from sfr.head import load_flow_head

    out = tmp_path / "diag"
    assert main(["diagnose", "--model", str(trained), "--data", str(eval_data), "--out", str(out), "--limit", "2",
                 "--num-draws", "4", "--steps", "4", "--solver", "euler", "--seed", "5"]) == 0
    printed = capsys.readouterr()
    assert "mean fork score" in printed.out
    report = json.loads((out / "fork_scores.json").read_text())
    # the spread against the noise, recomputed from the saved scores and standard errors
    verdict = noise_verdict([v for e in report["examples"] for v in e["fork_scores"]],
                            [v for e in report["examples"] for v in e["standard_errors"]])
    assert report["score_noise"] == pytest.approx(verdict["noise"], rel=1e-4) and report["score_noise"] > 0
    assert report["below_noise"] == verdict["below_noise"] and report["colour_scale"] == [0.0, 1.0]
    said = "sfr diagnose: warning: the fork scores vary across positions by std" in printed.err
    assert said == ("<b>Note:</b>" in (out / "fork_scores.html").read_text()) == report["below_noise"]
    assert (out / "fork_histogram.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "fork_scores.html").read_text()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    records = load_records(eval_data)[:2]
    assert len(report["examples"]) == 2
    for record, example in zip(records, report["examples"]):
        tokens = tokenize_example(record, tokenizer, max_length=512)
        labels = tokens["labels"]
        # every position whose next token is a response token is scored, and only those
        assert example["positions"] == [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
        assert len(example["fork_scores"]) == len(example["positions"]) > 0
        assert all(0.0 <= s <= 2.0 for s in example["fork_scores"])
        assert len(example["endpoint_norms"]) == len(example["positions"]) and min(example["endpoint_norms"]) > 0
    assert page.count('title="fork ') == report["anchors"] == sum(len(e["positions"]) for e in report["examples"])
    assert report["mean_fork_score"] == pytest.approx(
        sum(s for e in report["examples"] for s in e["fork_scores"]) / report["anchors"])
    # recompute the first example's scores from the saved model and head, same seed
    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    head, config = load_flow_head(trained / "sfr_head")
    assert report["source_std"] == config["source_std"]
    assert report["source_norm"] == pytest.approx(config["source_std"] * head.embed_dim ** 0.5)
    ids = torch.tensor(tokenize_example(records[0], tokenizer, max_length=512)["input_ids"])[None]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    expected = fork_scores(head, hidden[report["examples"][0]["positions"]], num_draws=4, steps=4, solver="euler",
                           source_std=config["source_std"], seed=5)
    assert report["examples"][0]["fork_scores"] == pytest.approx(expected.tolist(), abs=1e-4)


def test_diagnose_bad_input_is_a_clear_error(trained, eval_data, tmp_path, capsys):
    import shutil

    from sfr.cli import main

    no_head = tmp_path / "sft-like"
    shutil.copytree(trained, no_head, ignore=shutil.ignore_patterns("sfr_head"))
    cases = [
        (["--model", str(no_head), "--data", str(eval_data)], "no sfr_head"),
        (["--model", str(tmp_path / "nope"), "--data", str(eval_data)], "does not exist"),
        (["--model", str(trained), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--model", str(trained), "--data", str(eval_data), "--num-draws", "1"], "num_draws"),
        (["--model", str(trained), "--data", str(eval_data), "--steps", "0"], "steps"),
    ]
    weird = tmp_path / "weird.jsonl"
    weird.write_text('{"question": "?"}\n')
    cases.append((["--model", str(trained), "--data", str(weird)], "no known format"))
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\xff\xfe\x00not json")
    cases.append((["--model", str(trained), "--data", str(garbage)], "garbage.jsonl"))
    for argv, message in cases:
        assert main(["diagnose", *argv, "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("sfr diagnose: error:") and message in last, (argv, err)


def test_diagnose_checks_out_and_device_before_any_work(trained, eval_data, tmp_path, capsys, monkeypatch):
    import sfr.diagnostics
    from sfr.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sfr.diagnostics, "_load", no_loading)
    afile = tmp_path / "afile"
    afile.write_text("")
    base = ["diagnose", "--model", str(trained), "--data", str(eval_data), "--limit", "1"]
    for out, message in ((afile, "--out"), (afile / "x", "--out")):
        assert main([*base, "--out", str(out)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"sfr diagnose: error: {message} {out}"), last
    # cuda:99 exists nowhere: "not available" on a CPU machine, "has N cuda device(s)" on a GPU one
    for device in ("cuda:99", "bogus"):
        assert main([*base, "--out", str(tmp_path / "o"), "--device", device]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"sfr diagnose: error: --device {device!r}"), last
    assert not (tmp_path / "o").exists()


def test_diagnose_help_states_every_default():
    import argparse

    from sfr.commands.diagnose import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    undocumented = [action.option_strings[0] for action in parser._actions
                    if action.option_strings and action.nargs != 0 and not action.required
                    and "default" not in (action.help or "")]
    assert undocumented == []
