"""Generation, NLL and the CLI through the real tiny model (``sfr-tiny``; skipped if it cannot be built)."""
import gzip
import json

import pytest
import torch

from sfr.eval.dialogue import evaluate_dialogue, reply_nll
from sfr.eval.generation import load_model, render_prompts, sample

pytestmark = [pytest.mark.filterwarnings("ignore:sandbox:RuntimeWarning")]


@pytest.fixture(scope="module")
def tiny():
    try:
        return load_model("sfr-tiny", device="cpu")
    except Exception as exc:
        pytest.skip(f"tiny model not available: {exc}")


MESSAGES = [[{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What is for dinner?"}],
            [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "How are you?"}]]


def test_sample_shapes_seed_and_greedy(tiny):
    model, tokenizer = tiny
    first = sample(model, tokenizer, MESSAGES, n=3, temperature=1.0, max_new_tokens=8, batch_size=4, seed=5,
                   progress=False)
    assert [len(replies) for replies in first] == [3, 3] and all(isinstance(r, str) for r in first[0])
    again = sample(model, tokenizer, MESSAGES, n=3, temperature=1.0, max_new_tokens=8, batch_size=4, seed=5,
                   progress=False)
    assert again == first
    greedy = sample(model, tokenizer, ["Hello there"], n=2, temperature=0.0, max_new_tokens=6, progress=False)
    assert greedy[0][0] == greedy[0][1]
    # left padding: a prompt's greedy reply does not depend on the other prompts of its batch
    alone = sample(model, tokenizer, MESSAGES[:1], n=1, temperature=0.0, max_new_tokens=6, progress=False)
    batched = sample(model, tokenizer, MESSAGES, n=1, temperature=0.0, max_new_tokens=6, batch_size=2, progress=False)
    assert batched[0] == alone[0]
    texts, templated = render_prompts(tokenizer, MESSAGES)
    assert templated and "You are a pirate." in texts[0]
    with pytest.raises(TypeError):
        render_prompts(tokenizer, ["text", MESSAGES[0]])
    with pytest.raises(ValueError, match="n must"):
        sample(model, tokenizer, MESSAGES, n=0)


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
    assert metrics["style_accuracy"] is not None and metrics["mode_coverage"] is None  # no corpus labels here
    assert len(results["samples"]["tiny"]) == 2
    json.dumps(results)

    from sfr.cli import main

    out = tmp_path / "dialogue-out"
    assert main(["eval", "dialogue", "--model", "sfr-tiny", "--data", str(data), "--samples", "2",
                 "--max-new-tokens", "6", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert "sfr-tiny" in saved["models"] and (out / "metrics.png").stat().st_size > 0
    assert "| sfr-tiny |" in (out / "report.md").read_text()


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
    assert main(["eval", "code", "--model", "sfr-tiny", "--data", str(data), "--n", "2", "--k", "1,5"]) == 2
    assert "--k 5 > --n 2" in capsys.readouterr().err
    assert main(["eval", "code", "--model", "sfr-tiny", "--data", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "code", "--model", "x", "--data", str(data), "--sandbox", "docker"])
