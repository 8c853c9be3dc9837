import json
import math

import numpy as np
import pytest

from sfr.eval.dialogue import PersonaClassifier, fit_persona_classifier, load_dialogue, load_encoder, score_replies


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _conversation(system, user, reply, **extra):
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": reply}], **extra}


@pytest.fixture(scope="module")
def encoder():
    try:
        return load_encoder(None, device="cpu")
    except Exception as exc:  # the offline encoder package is missing
        pytest.skip(f"sentence encoder not available offline: {exc}")


def test_load_dialogue_merges_identical_prompts_and_limits(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        _conversation("pirate", "dinner?", "Arr, pasta!"),
        _conversation("pirate", "dinner?", "Arr, curry!"),
        _conversation("robot", "dinner?", "BEEP. Salad."),
    ])
    prompts = load_dialogue(path)
    assert len(prompts) == 2
    assert prompts[0].references == ["Arr, pasta!", "Arr, curry!"] and prompts[0].system == "pirate"
    assert prompts[0].messages[-1] == {"role": "user", "content": "dinner?"}
    assert len(load_dialogue(path, limit=1)) == 1


@pytest.mark.parametrize("name, content, match", [
    ("bad.jsonl", "not json\n", "cannot read dialogue data .*line 1"),
    ("bad.jsonl", json.dumps({"text": "hello"}) + "\n", "no known format"),
    ("bad.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
     "last message must be the assistant"),
    ("bad.jsonl", "\n", "cannot read dialogue data .*empty"),
    ("bad.xml", "<a/>", "unknown type"),
    ("bad.jsonl.gz", "not gzip at all", "cannot read dialogue data"),
])
def test_load_dialogue_bad_input(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_dialogue(path)
    with pytest.raises(ValueError, match="missing.jsonl.*does not exist"):
        load_dialogue(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="limit"):
        load_dialogue(tmp_path / name, limit=0)


def test_load_dialogue_prompt_completion_formats(tmp_path):
    path = _write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Once upon a time", "completion": " there was a fox."},
        {"prompt": [{"role": "system", "content": "pirate"}, {"role": "user", "content": "hi"}],
         "completion": [{"role": "assistant", "content": "Arr!"}]},
    ])
    text, chat = load_dialogue(path)
    assert text.text == "Once upon a time" and text.model_input == "Once upon a time"
    assert text.references == [" there was a fox."] and text.system == ""
    assert chat.text is None and chat.model_input == chat.messages and chat.system == "pirate"
    assert chat.references == ["Arr!"] and not chat.is_corpus


def _persona_chat_csv(path):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user 1 personas", "user 2 personas", "Best Generated Conversation"])
        writer.writerow(["I like cats.\nI am a baker.", "I surf.", "User 1: Hi!\nUser 2: Hello, I surf.\n"
                         "User 1: I bake bread.\nUser 2: Cool!"])
    return path


def test_load_dialogue_reads_persona_chat_csv(tmp_path):
    prompts = load_dialogue(_persona_chat_csv(tmp_path / "chat.csv"))
    # one prompt per turn after the first: its speaker's persona as the system message
    assert [p.references for p in prompts] == [["Hello, I surf."], ["I bake bread."], ["Cool!"]]
    assert prompts[0].system == "I surf." and prompts[1].system == "I like cats. I am a baker."
    assert prompts[1].messages[1:] == [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Hello, I surf."}]
    # persona-chat records carry a free-text "persona": not a corpus persona, so no corpus metrics
    assert not any(p.is_corpus for p in prompts)
    metrics = score_replies(prompts, [["I surf a lot.", "Waves!"]] * 3)
    assert metrics["style_marker_rate"] is None and metrics["mode_coverage"] is None
    assert metrics["distinct_1"] == pytest.approx(1.0)


def test_limit_spreads_over_conversations_and_personas_with_a_seed(tmp_path):
    import csv

    rng = np.random.default_rng()  # fresh data each run: 6 conversations of 5 to 9 turns
    path = tmp_path / "chats.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user 1 personas", "user 2 personas", "Best Generated Conversation"])
        for row in range(6):
            turns = [f"User {1 + t % 2}: line {t} of chat {row} ({rng.integers(10**6)})"
                     for t in range(int(rng.integers(5, 10)))]
            writer.writerow([f"I am persona A{row}.", f"I am persona B{row}.", "\n".join(turns)])
    everything = load_dialogue(path)
    conversation_of = {id(p): p.messages[1]["content"].split(" of chat ")[1][:1] for p in everything}
    assert len(set(conversation_of.values())) == 6
    for limit in (3, 6):
        chosen = load_dialogue(path, limit)  # the first `limit` turns would all come from chat 0
        chats = {p.messages[1]["content"].split(" of chat ")[1][:1] for p in chosen}
        assert len(chosen) == limit and len(chats) == limit and len({p.system for p in chosen}) == limit
    twelve = load_dialogue(path, 12)  # every persona (2 per chat) once before any gives a second prompt
    assert sorted(p.system for p in twelve) == sorted(f"I am persona {s}{r}." for s in "AB" for r in range(6))
    same = [p.references for p in load_dialogue(path, 4, seed=3)]
    assert same == [p.references for p in load_dialogue(path, 4, seed=3)]  # seeded
    assert len({tuple(map(tuple, [p.references for p in load_dialogue(path, 4, seed=s)])) for s in range(8)}) > 1
    order = [p.references for p in everything]
    assert [order.index(p.references) for p in load_dialogue(path, 5, seed=1)] == sorted(
        order.index(p.references) for p in load_dialogue(path, 5, seed=1))  # kept in file order


def test_language_warnings_flag_replies_far_from_language():
    from sfr.eval.dialogue import language_warnings

    garbage = language_warnings({"reference_nll": 7.9, "heldout_nll": 7.4}, references_nll=3.1, vocab_size=2048)
    assert len(garbage) == 2 and "7.9 nats/token" in garbage[0] and "3.1" in garbage[0]
    assert "97% of a uniform guess over its 2048 tokens" in garbage[1]
    assert language_warnings({"reference_nll": 3.9, "heldout_nll": 2.1}, references_nll=3.1, vocab_size=2048) == []
    assert language_warnings({"reference_nll": 9.0, "heldout_nll": None}, references_nll=None, vocab_size=None) == []


def test_shared_persona_chat_loads(shared_data):
    path = shared_data / "synthetic-persona-chat" / "test.csv"
    if not path.exists():
        pytest.skip(f"{path} not found")
    prompts = load_dialogue(path, limit=40)
    assert len(prompts) == 40 and all(len(p.references) == 1 for p in prompts)
    assert len({p.system for p in prompts}) >= 2 and all(p.messages[0]["role"] == "system" for p in prompts)


def test_corpus_valid_replies_accept_every_reference_and_reject_other_personas():
    corpus = pytest.importorskip("sfr.corpus")
    from sfr.eval.dialogue import _normalise, corpus_valid_replies

    for record in corpus.build_corpus("eval"):
        reply = record["messages"][-1]["content"]
        assert _normalise(reply) in corpus_valid_replies(record["persona"], record["prompt_id"])
        other = next(p for p in corpus.PERSONAS if p != record["persona"])
        assert _normalise(reply) not in corpus_valid_replies(other, record["prompt_id"])
    assert "" not in corpus_valid_replies("pirate", "dinner")


def test_judge_loader(tmp_path, monkeypatch):
    from sfr.eval.dialogue import load_judge

    (tmp_path / "my_judge.py").write_text("def score(messages, reply):\n    return float(len(reply))\nNOT = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_judge("my_judge:score")([], "abc") == 3.0
    for spec, match in (("my_judge", "module:function"), ("nope_module:f", "cannot import"),
                        ("my_judge:missing", "cannot import"), ("my_judge:NOT", "not callable")):
        with pytest.raises(ValueError, match=match):
            load_judge(spec)


def test_judge_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    import os
    import sys

    from sfr.eval.dialogue import load_judge

    # like the `sfr` console script: the current directory is not on sys.path
    (tmp_path / "judge_in_cwd.py").write_text("def score(messages, reply):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", os.getcwd())])
    monkeypatch.delitem(sys.modules, "judge_in_cwd", raising=False)
    assert load_judge("judge_in_cwd:score")([], "abc") == 0.5
    assert sys.path[0] == os.getcwd()
    sys.modules.pop("judge_in_cwd", None)


def test_nearest_centroid_and_logistic_classifiers_separate_clusters():
    rng = np.random.default_rng(3)
    centers = np.eye(4)[:2] * 5
    x = np.concatenate([centers[0] + rng.normal(size=(20, 4)), centers[1] + rng.normal(size=(20, 4))])
    y = [0] * 20 + [1] * 20
    classifier = PersonaClassifier(x, y)
    test = np.concatenate([centers[0] + rng.normal(size=(10, 4)), centers[1] + rng.normal(size=(10, 4))])
    assert (classifier.predict(test) == np.array([0] * 10 + [1] * 10)).mean() >= 0.95
    with pytest.raises(ValueError, match="at least 2"):
        PersonaClassifier(x, [0] * 40)


def test_nearest_centroid_fallback_without_scikit_learn(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)  # import fails -> nearest centroid
    x = np.array([[1.0, 0.1], [0.9, -0.1], [-1.0, 0.2], [-0.8, -0.1]])
    classifier = PersonaClassifier(x, [3, 3, 7, 7])
    assert classifier.kind == "nearest_centroid"
    assert classifier.predict(np.array([[2.0, 0.5], [-0.5, 0.4], [0.1, 0.0]])).tolist() == [3, 7, 3]


def test_scores_on_the_embedded_corpus_references(encoder):
    corpus = pytest.importorskip("sfr.corpus")
    records = corpus.build_corpus("eval")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        prompts = load_dialogue(corpus.write_jsonl(records, Path(tmp) / "eval.jsonl"))
    prompts = prompts[:6]  # 6 (persona, prompt) pairs, 10 references each
    classifier, labels = fit_persona_classifier(prompts, encoder)
    # the references themselves as "samples": right style, modes at their known frequencies
    faithful = score_replies(prompts, [p.references for p in prompts], encoder, classifier, labels)
    assert faithful["style_marker_rate"] == 1.0
    assert faithful["style_accuracy"] >= 0.9
    assert faithful["mode_coverage"] == 1.0 and faithful["mode_total_variation"] == pytest.approx(0.0, abs=1e-12)
    expected_entropy = np.mean([-sum(q * math.log(q) for q in corpus.mode_frequencies(p.prompt_id).values() if q > 0)
                                for p in prompts])
    assert faithful["mode_entropy"] == pytest.approx(expected_entropy)
    assert faithful["valid_reply_rate"] == 1.0 and faithful["on_topic_rate"] == 1.0
    assert len(faithful["per_prompt"]["distinct_1"]) == 6
    assert faithful["distinct_1"] == pytest.approx(np.mean(faithful["per_prompt"]["distinct_1"]))
    # a collapsed model: one reply repeated, with another persona's style
    other = {p.system: next(q for q in prompts if q.system != p.system) for p in prompts}
    collapsed = score_replies(prompts, [[other[p.system].references[0]] * 4 for p in prompts], encoder,
                              classifier, labels)
    assert collapsed["self_bleu"] == pytest.approx(100.0) and collapsed["distinct_1"] < faithful["distinct_1"]
    assert collapsed["embedding_diversity"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["mode_entropy"] == 0.0 and collapsed["style_accuracy"] <= 0.1
    assert collapsed["valid_reply_rate"] == 0.0  # well-formed, but in another persona's style
    assert collapsed["style_marker_rate"] == 0.0  # each persona's marker matches none of the others' replies
    assert faithful["embedding_diversity"] > 0.05


def test_judge_hook_is_averaged(encoder, tmp_path):
    prompts = load_dialogue(_write_jsonl(tmp_path / "d.jsonl", [_conversation("a", "q", "r")]))
    calls = []

    def judge(messages, reply):
        calls.append((messages[-1]["content"], reply))
        return len(reply)

    metrics = score_replies(prompts, [["ab", "abcd"]], encoder=None, judge=judge)
    assert metrics["judge_score"] == 3.0 and calls == [("q", "ab"), ("q", "abcd")]
    assert metrics["embedding_diversity"] is None and metrics["reference_nll"] is None


# ---- the report and the command line, without a model -------------------------------------------------
def _results(**settings):
    metrics = {"distinct_1": 0.5, "heldout_nll": 2.0, "style_accuracy": None, "per_prompt": {}}
    return {"models": {"m": metrics}, "corpus": None,
            "settings": {"data": "d.jsonl", "num_prompts": 2, "samples": 2, "reference_model": None,
                         "style_classifier": None, "personas": 1, **settings}}


def test_report_says_why_style_accuracy_and_reference_nll_are_missing(tmp_path):
    from sfr.eval.report import write_dialogue_report

    report = (tmp_path / "a" / "report.md")
    write_dialogue_report(_results(), tmp_path / "a")
    text = report.read_text()
    assert "style accuracy" not in text.split("\n\n")[2]  # not a column of the table
    assert "needs reference replies from ≥ 2 personas" in text and "these prompts have 1" in text
    assert "`None`" not in text and "reference-model NLL: not computed (no `--reference-model`)" in text
    write_dialogue_report(_results(reference_model="sfr-tiny", style_classifier="logistic_regression", personas=3),
                          tmp_path / "b")
    text = (tmp_path / "b" / "report.md").read_text()
    assert "the samples' NLL/token under `sfr-tiny`" in text and "a logistic-regression persona classifier" in text
    assert "not computed" not in text


def test_report_shows_the_class_count_and_chance_next_to_style_accuracy_and_flags_non_language(tmp_path):
    from sfr.eval.report import write_dialogue_report

    results = _results(style_classifier="logistic_regression", personas=2, style_classes=2, style_chance=0.5,
                       style_majority=0.6, reference_model="base", reference_nll_of_references=3.25)
    results["models"]["m"].update(style_accuracy=0.6, reference_nll=8.5,
                                  language_warnings=["its replies cost 8.5 nats/token"])
    write_dialogue_report(results, tmp_path / "r")
    text = (tmp_path / "r" / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert "style accuracy (classifier) ↑ (2 classes, chance 0.5)" in header
    assert "over 2 personas" in text and "0.5 by guessing uniformly and 0.6 by always guessing" in text
    assert "3.25 for the data's own replies" in text
    assert "**Warning: the replies of `m` are probably not language** (its replies cost 8.5 nats/token)" in text
    results["models"]["m"]["language_warnings"] = []
    write_dialogue_report(results, tmp_path / "ok")
    assert "Warning" not in (tmp_path / "ok" / "report.md").read_text()


def _eval_parsers():
    import argparse

    from sfr.commands.eval import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices


def test_eval_help_states_every_default():
    for name, parser in _eval_parsers().items():
        undocumented = [action.option_strings[0] for action in parser._actions
                        if action.option_strings and action.nargs != 0 and not action.required
                        and "default" not in (action.help or "")]
        assert undocumented == [], name
        assert "(default eval-" + name in parser.format_help().replace("\n", " ")  # the --out folder


def test_eval_checks_out_before_loading_anything(tmp_path, capsys, monkeypatch):
    import sfr.eval.code
    import sfr.eval.dialogue
    from sfr.cli import main

    def no_work(*args, **kwargs):
        raise AssertionError("evaluation started before --out was checked")

    monkeypatch.setattr(sfr.eval.dialogue, "evaluate_dialogue", no_work)
    monkeypatch.setattr(sfr.eval.code, "evaluate_code", no_work)
    afile = tmp_path / "afile"
    afile.write_text("")
    for command in ("dialogue", "code"):
        for out in (afile, afile / "x"):
            assert main(["eval", command, "--model", "sfr-tiny", "--out", str(out)]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"sfr eval {command}: error: --out {out}") and "\n" not in err, err
