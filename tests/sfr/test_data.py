import copy
import csv
import json

import pytest

from sfr.corpus import build_corpus
from sfr.data import IGNORE_INDEX, convert_persona_chat, load_records, tokenize_example
from sfr.tiny_lm import default_model_path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFR_CACHE", str(tmp_path_factory.getbasetemp() / "sfr-cache"))
        yield AutoTokenizer.from_pretrained(default_model_path())


def _response_texts(example, tokenizer):
    """Decoded text of each maximal labelled run."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token  # unshifted labels
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


MULTI_TURN = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, then red."},
]}


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    record = build_corpus("train")[3]
    example = tokenize_example(record, tokenizer)
    assert len(example["input_ids"]) == len(example["labels"])
    assert _response_texts(example, tokenizer) == [record["messages"][2]["content"] + "<|end|>"]
    full = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == full

    multi = tokenize_example(MULTI_TURN, tokenizer)
    assert _response_texts(multi, tokenizer) == ["Blue.<|end|>", "Green, then red.<|end|>"]
    last_only = tokenize_example({**MULTI_TURN, "train_on": "last"}, tokenizer)
    assert last_only["input_ids"] == multi["input_ids"]
    assert _response_texts(last_only, tokenizer) == ["Green, then red.<|end|>"]


def test_prompt_completion_formats(tokenizer):
    plain = tokenize_example({"prompt": "Say hi.", "completion": "Hi there!"}, tokenizer)
    assert _response_texts(plain, tokenizer) == ["Hi there!<|end|>"]
    assert tokenizer.decode(plain["input_ids"]).startswith("<|bos|><|user|>Say hi.<|end|><|assistant|>")
    conversational = tokenize_example({
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello?"},
                   {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye?"}],
        "completion": [{"role": "assistant", "content": "Goodbye."}]}, tokenizer)
    assert _response_texts(conversational, tokenizer) == ["Goodbye.<|end|>"]  # prompt's assistant turn is context

    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    raw = tokenize_example({"prompt": "def f():", "completion": " return 1"}, no_template)
    assert tokenizer.decode(raw["input_ids"]) == "def f(): return 1<|end|>"
    assert _response_texts(raw, tokenizer) == [" return 1<|end|>"]
    with pytest.raises(ValueError, match="chat template"):
        tokenize_example(MULTI_TURN, no_template)


def test_truncation_and_unknown_records(tokenizer):
    full = tokenize_example(MULTI_TURN, tokenizer)
    cut = tokenize_example(MULTI_TURN, tokenizer, max_length=12)
    assert cut["input_ids"] == full["input_ids"][:12] and cut["labels"] == full["labels"][:12]
    with pytest.raises(ValueError, match="max_length"):
        tokenize_example(MULTI_TURN, tokenizer, max_length=0)
    with pytest.raises(ValueError, match=r"keys \['text'\]"):
        tokenize_example({"text": "hello"}, tokenizer)


def test_load_records_from_files_and_datasets(tmp_path):
    import datasets

    records = build_corpus("eval", examples_per_pair=1)[:4]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_records(jsonl) == records
    as_list = tmp_path / "data.json"
    as_list.write_text(json.dumps(records))
    assert load_records(as_list) == records
    pc = [{"prompt": "a", "completion": "b"}]
    datasets.Dataset.from_list(pc).save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "saved") == pc
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pc)}).save_to_disk(str(tmp_path / "saved_dict"))
    assert load_records(str(tmp_path / "saved_dict")) == pc
    with pytest.raises(ValueError, match="no split 'test'"):
        load_records(tmp_path / "saved_dict", split="test")


def test_load_records_bad_input_names_the_problem(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(missing)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_records(bad_json)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"prompt": "a", "completion": "b"}\n\n{"question": "a", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"line 3 is in no known format.*\['answer', 'question'\]"):
        load_records(unknown)  # blank lines are skipped but still counted
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_records(empty)
    bad_message = tmp_path / "bad_message.jsonl"
    bad_message.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match="line 1: message 0"):
        load_records(bad_message)
    with pytest.raises(ValueError, match="could not load data set"):
        load_records("surely-not-a-dataset-name-sfr")


def test_convert_persona_chat_on_a_small_csv(tmp_path):
    path = tmp_path / "mini.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user 1 personas", "user 2 personas", "Best Generated Conversation"])
        writer.writerow(["I like cats.\nI am tall.", "I bake bread.",
                         "User 1: Hello!\nUser 2: Hi, I bake.\nUser 1: Nice.\nI love bread.\nUser 2: Thanks!"])
        writer.writerow(["A.", "B.", ""])
    records = convert_persona_chat(path)
    assert [r["turn"] for r in records] == [1, 2, 3]
    second = records[1]
    assert second["messages"] == [
        {"role": "system", "content": "I like cats. I am tall."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Hi, I bake."},
        {"role": "assistant", "content": "Nice. I love bread."},
    ]
    assert second["train_on"] == "last" and second["speaker"] == "User 1"
    assert records[0]["messages"][0]["content"] == "I bake bread."
    assert load_records(path) == records  # load_records recognises the layout
    not_persona = tmp_path / "other.csv"
    not_persona.write_text("prompt,completion\nhi,there\n")
    assert load_records(not_persona) == [{"prompt": "hi", "completion": "there"}]
    with pytest.raises(ValueError, match="missing columns"):
        convert_persona_chat(not_persona)


def test_convert_real_persona_chat(shared_data, tokenizer):
    path = shared_data / "synthetic-persona-chat" / "test.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    records = convert_persona_chat(path)
    assert len({r["conversation"] for r in records}) > 900
    for record in records[:200]:
        messages = record["messages"]
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"
        roles = [m["role"] for m in messages[1:]]
        assert all(a != b for a, b in zip(roles, roles[1:]))  # the speakers alternate
        assert not any(m["content"].startswith("User ") for m in messages)
    example = tokenize_example(records[5], tokenizer)
    assert _response_texts(example, tokenizer) == [records[5]["messages"][-1]["content"] + "<|end|>"]
