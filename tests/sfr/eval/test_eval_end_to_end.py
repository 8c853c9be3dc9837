"""NLL, the dialogue and code evaluations and their CLI through the real tiny model (``sfr-tiny``; skipped if
it cannot be built). Sampling itself: test_eval_generation.py."""
import gzip
import json
import math

import pytest
import torch
from tiny_chat import MESSAGES

from sfr.eval.dialogue import evaluate_dialogue, reply_nll

pytestmark = [pytest.mark.filterwarnings("ignore:sandbox:RuntimeWarning")]


def test_reply_nll_matches_the_model_loss(tiny):
    model, tokenizer = tiny
    reply = " Arr, pasta tonight!"
    total, count = reply_nll(model, tokenizer, [MESSAGES[0], MESSAGES[1]], [reply, reply], batch_size=2)
    context = tokenizer.apply_chat_template(MESSAGES[0], tokenize=False, add_generation_prompt=True)
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + reply_ids])
    labels = ids.clone()
    labels[0, :len(context_ids)] = -100
    with torch.no_grad():
        mean_loss = model(input_ids=ids, labels=labels).loss.item()
    total_one, count_one = reply_nll(model, tokenizer, [MESSAGES[0]], [reply])
    assert count_one == len(reply_ids) and count == 2 * len(reply_ids)
    assert total_one / count_one == pytest.approx(mean_loss, rel=1e-4)


def test_evaluate_dialogue_and_cli_end_to_end(tiny, tmp_path):
    model, tokenizer = tiny
    data = tmp_path / "dialogue.jsonl"
    data.write_text("".join(json.dumps({"messages": m + [{"role": "assistant", "content": ref}]}) + "\n"
                            for m, ref in zip(MESSAGES, ["Arr, fish stew!", "BEEP. All systems nominal."])))
    results = evaluate_dialogue([("tiny", model, tokenizer)], data, samples=2, max_new_tokens=8,
                                reference_model=(model, tokenizer), progress=False)
    metrics = results["models"]["tiny"]
    assert 0 <= metrics["distinct_1"] <= 1 and metrics["reference_nll"] > 0
    # the samples' NLL under the reference model (here: the model itself) and the references' NLL
    checked = 0
    for i, sampled in enumerate(results["samples"]["tiny"]):
        total, count = reply_nll(model, tokenizer, [MESSAGES[i]] * 2, sampled["replies"])
        got = metrics["per_prompt"]["reference_nll"][i]
        if count == 0:  # both samples empty (an untrained model may stop at once): no token, no NLL
            assert got is None
        else:
            assert got == pytest.approx(total / count, rel=1e-5)
            checked += 1
    assert checked >= 1  # reference_nll > 0 above: some prompt had sampled tokens
    total, count = reply_nll(model, tokenizer, [MESSAGES[1]], ["BEEP. All systems nominal."])
    assert metrics["per_prompt"]["heldout_nll"][1] == pytest.approx(total / count, rel=1e-5)
    assert metrics["style_accuracy"] is not None and metrics["mode_coverage"] is None  # no corpus labels here
    assert results["settings"]["style_classes"] == 2 and results["settings"]["style_chance"] == 0.5
    # the reference model is the model itself here: its NLL of the references is the held-out NLL
    assert results["settings"]["reference_nll_of_references"] == pytest.approx(metrics["heldout_nll"], rel=1e-6)
    # the untrained tiny LM does not model language (held-out NLL near ln V): its replies are flagged
    assert metrics["heldout_nll"] > 0.7 * math.log(model.config.vocab_size)
    assert any("uniform guess" in warning for warning in metrics["language_warnings"])
    assert len(results["samples"]["tiny"]) == 2
    json.dumps(results)

    from sfr.cli import main

    out = tmp_path / "dialogue-out"
    assert main(["eval", "dialogue", "--model", "sfr-tiny", "--data", str(data), "--samples", "2",
                 "--max-new-tokens", "6", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert "sfr-tiny" in saved["models"] and (out / "metrics.png").stat().st_size > 0
    assert "| sfr-tiny |" in (out / "report.md").read_text()
    assert "**Warning: the replies of `sfr-tiny` are probably not language**" in (out / "report.md").read_text()

    # Synthetic-Persona-Chat CSV, two models side by side, an external judge from the command line
    import csv
    import sys

    chat = tmp_path / "chat.csv"
    with open(chat, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user 1 personas", "user 2 personas", "Best Generated Conversation"])
        writer.writerow(["I like cats.", "I surf.", "User 1: Hi!\nUser 2: Hello, I surf.\nUser 1: I bake bread."])
    (tmp_path / "judge_for_test.py").write_text("def judge(messages, reply):\n    return 0.25\n")
    sys.path.insert(0, str(tmp_path))
    try:
        out = tmp_path / "chat-out"
        assert main(["eval", "dialogue", "--model", "sfr-tiny", "--model", "sfr-tiny", "--data", str(chat),
                     "--samples", "2", "--max-new-tokens", "4", "--judge", "judge_for_test:judge",
                     "--out", str(out)]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["models"]) == ["sfr-tiny", "sfr-tiny (1)"] and saved["settings"]["num_prompts"] == 2
    assert all(m["judge_score"] == 0.25 for m in saved["models"].values())
    # the same model and seed side by side: the same samples, the same numbers
    assert saved["models"]["sfr-tiny"]["distinct_1"] == saved["models"]["sfr-tiny (1)"]["distinct_1"]
    assert main(["eval", "dialogue", "--model", "sfr-tiny", "--data", str(chat), "--judge", "nope"]) == 2
    assert main(["eval", "dialogue", "--model", "sfr-tiny", "--data", str(tmp_path / "nope.csv")]) == 2


def test_code_cli_end_to_end_and_errors(tiny, tmp_path, capsys):
    from sfr.cli import main

    data = tmp_path / "toy.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.write(json.dumps({"task_id": "Toy/0", "prompt": "def one():\n    \"\"\"Return 1.\"\"\"\n",
                            "entry_point": "one", "canonical_solution": "    return 1\n",
                            "test": "def check(candidate):\n    assert candidate() == 1\n"}) + "\n")
    out = tmp_path / "code-out"
    assert main(["eval", "code", "--model", "sfr-tiny", "--data", str(data), "--n", "2", "--k", "1,2",
                 "--max-new-tokens", "8", "--prompt-style", "completion", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    row = saved["problems"][0]
    assert row["n"] == 2 and 0 <= row["c"] <= 2 and len(row["completions"]) == 2
    assert saved["pass_at_k"]["pass@2"] >= saved["pass_at_k"]["pass@1"]
    assert saved["sandbox"] in ("bwrap", "rlimit") and (out / "pass_at_k.png").is_file()
    # MBPP format, two models side by side
    mbpp = tmp_path / "mbpp.json"
    mbpp.write_text(json.dumps([{"task_id": 7, "prompt": "Return one.", "code": "def one():\n    return 1",
                                 "test_imports": [], "test_list": ["assert one() == 1"]}]))
    both = tmp_path / "code-both"
    assert main(["eval", "code", "--model", "sfr-tiny", "--model", "sfr-tiny", "--data", str(mbpp), "--n", "2",
                 "--k", "1", "--max-new-tokens", "4", "--out", str(both)]) == 0
    saved = json.loads((both / "results.json").read_text())
    assert sorted(saved) == ["sfr-tiny", "sfr-tiny (1)"]
    assert all(r["problems"][0]["task_id"] == "7" and r["n"] == 2 for r in saved.values())
    assert "| sfr-tiny (1) |" in (both / "report.md").read_text()
    # no --data: the embedded problems
    embedded = tmp_path / "code-embedded"
    assert main(["eval", "code", "--model", "sfr-tiny", "--n", "1", "--k", "1", "--max-new-tokens", "4",
                 "--limit", "2", "--out", str(embedded)]) == 0
    saved = json.loads((embedded / "results.json").read_text())
    assert saved["data"] == "<embedded>" and [r["task_id"] for r in saved["problems"]] == ["sfr/0", "sfr/1"]
    assert main(["eval", "code", "--model", "sfr-tiny", "--data", str(data), "--n", "2", "--k", "1,5"]) == 2
    assert "--k 5 > --n 2" in capsys.readouterr().err
    assert main(["eval", "code", "--model", "sfr-tiny", "--data", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "code", "--model", "x", "--data", str(data), "--sandbox", "docker"])


def test_cli_on_the_shared_data(tiny, shared_data, tmp_path):
    from sfr.cli import main

    chat = shared_data / "synthetic-persona-chat" / "test.csv"
    if chat.exists():
        out = tmp_path / "chat"
        assert main(["eval", "dialogue", "--model", "sfr-tiny", "--data", str(chat), "--limit", "3", "--samples", "2",
                     "--max-new-tokens", "4", "--out", str(out)]) == 0
        saved = json.loads((out / "results.json").read_text())
        metrics = saved["models"]["sfr-tiny"]
        assert saved["settings"]["num_prompts"] == 3 and saved["settings"]["style_classes"] >= 2
        assert metrics["style_accuracy"] is not None and metrics["heldout_nll"] > 0
        assert metrics["mode_coverage"] is None and saved["corpus"] is None  # not the embedded corpus
    for name in ("humaneval/HumanEval.jsonl.gz", "mbpp/sanitized-mbpp.json"):
        path = shared_data / name
        if not path.exists():
            continue
        out = tmp_path / path.name
        assert main(["eval", "code", "--model", "sfr-tiny", "--data", str(path), "--limit", "1", "--n", "2", "--k", "1",
                     "--max-new-tokens", "8", "--out", str(out)]) == 0
        saved = json.loads((out / "results.json").read_text())
        assert saved["num_problems"] == 1 and saved["problems"][0]["n"] == 2
        assert 0.0 <= saved["pass_at_k"]["pass@1"] <= 1.0


def test_evaluate_dialogue_scores_each_question_across_its_styles(tiny, tmp_path):
    from sfr.eval.cross_style import score_cross_style
    from sfr.eval.dialogue import load_dialogue, load_encoder

    model, tokenizer = tiny
    data = tmp_path / "styles.jsonl"
    question = MESSAGES[0][1]
    data.write_text("".join(json.dumps({"messages": [{"role": "system", "content": system}, question,
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for system, reply in [("You are a pirate.", "Arr, stew."), ("You are a robot.", "BEEP."),
                                                  ("You are a poet.", "Stew, come what may.")]))
    results = evaluate_dialogue([("tiny", model, tokenizer)], data, samples=2, max_new_tokens=6, progress=False)
    metrics = results["models"]["tiny"]
    replies = [row["replies"] for row in results["samples"]["tiny"]]
    expected = score_cross_style(load_dialogue(data), replies, load_encoder(None))
    assert metrics["cross_style"] == expected["cross_style"] and metrics["cross_style"]["styles"] == [3]
    assert metrics["cross_style_self_bleu"] == expected["cross_style_self_bleu"] is not None
    assert metrics["cross_style_similarity"] == pytest.approx(expected["cross_style_similarity"])
    assert "cross_style_similarity" not in metrics["per_prompt"]  # per question, not per prompt
