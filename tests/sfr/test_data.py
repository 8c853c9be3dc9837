import copy
import csv
import json
import re

import pytest

from sfr.corpus import build_corpus
from sfr.data import IGNORE_INDEX, convert_persona_chat, load_records, tokenize_example, validate_records
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


def test_a_malformed_jsonl_line_is_named_with_its_number_and_an_excerpt_not_a_column(tmp_path):
    # the closing quote of "fine" is missing: the parser complains at the end of the line
    bad = tmp_path / "bad.jsonl"
    broken = '{"messages": [{"role": "user", "content": "hi there, how are you"}, {"role": "assistant", "content": "fine}]}'
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n' + broken + "\n")
    with pytest.raises(ValueError) as error:
        load_records(bad)
    message = str(error.value)
    assert message.startswith(f"{bad}: line 3 is not valid JSON (")  # blank lines count
    assert message.endswith('"role": "assistant", "content": "fine}]}') and "column" not in message
    assert len(message) < len(str(bad)) + 130  # an excerpt, not the whole line
    long_list = tmp_path / "list.json"
    long_list.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "c" "completion": "d"}]\n')
    with pytest.raises(ValueError, match=r'list.json: invalid JSON near line 2 \(Expecting .,. delimiter\): '
                                         r' \{"prompt": "c" "completion": "d"\}\]$'):
        load_records(long_list)


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
                         "User 1: Hello!\nUser 2: Hi, I bake.\n[User 2 shows a loaf]\nUser 1: Nice.\nI love bread.\n"
                         "User 2: Thanks!\n* * *\nUser 2: See you."])
        writer.writerow(["A.", "B.", "* * User 1: * * Hey.\n* * User 2: * * Yo."])  # markdown-bold prefixes
        writer.writerow(["A.", "B.", ""])
        writer.writerow(["C.", "D.", "Hi there.\n\n(waves)\nHello!\n\nBye."])  # no prefixes: alternate, User 1 first
    records = convert_persona_chat(path)
    # one record per turn after the first (turn 0 has nothing to reply to)
    assert [(r["conversation"], r["turn"], r["speaker"]) for r in records] == [
        (0, 1, "User 2"), (0, 2, "User 1"), (0, 3, "User 2"), (1, 1, "User 2"), (3, 1, "User 2"), (3, 2, "User 1")]
    assert records[-1]["messages"] == [{"role": "system", "content": "C."}, {"role": "assistant", "content": "Hi there."},
                                       {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Bye."}]
    assert records[0]["messages"] == [{"role": "system", "content": "I bake bread."},
                                      {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, I bake."}]
    assert records[1]["messages"] == [
        {"role": "system", "content": "I like cats. I am tall."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Hi, I bake."},  # the stage direction is dropped
        {"role": "assistant", "content": "Nice. I love bread."},  # an unprefixed line continues the turn
    ]
    # User 2's consecutive turns (across the "* * *" scene break) are merged into one
    assert records[2]["messages"][0] == {"role": "system", "content": "I bake bread."}
    assert records[2]["messages"][-1] == {"role": "assistant", "content": "Thanks! See you."}
    assert [m["role"] for m in records[2]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert records[3]["messages"][1:] == [{"role": "user", "content": "Hey."}, {"role": "assistant", "content": "Yo."}]
    assert all(r["train_on"] == "last" and r["persona"] == r["messages"][0]["content"] for r in records)
    assert load_records(path) == records  # load_records recognises the layout
    not_persona = tmp_path / "other.csv"
    not_persona.write_text("prompt,completion\nhi,there\n")
    assert load_records(not_persona) == [{"prompt": "hi", "completion": "there"}]
    with pytest.raises(ValueError, match="missing columns"):
        convert_persona_chat(not_persona)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        convert_persona_chat(tmp_path / "nope.csv")


def test_convert_real_persona_chat(shared_data, tokenizer):
    path = shared_data / "synthetic-persona-chat" / "test.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    records = convert_persona_chat(path)
    spoken = {i for i, row in enumerate(rows) if row["Best Generated Conversation"].strip()}
    assert {r["conversation"] for r in records} == spoken and len(spoken) > 900  # every conversation yields examples
    turns = sum(1 for row in rows for line in row["Best Generated Conversation"].splitlines()
                if re.match(r"^[*\s]*User [12]\s*:", line.strip()))
    first_turns = len(spoken)  # turn 0 of each conversation gets no record
    assert 0.95 * (turns - first_turns) <= len(records) <= 1.05 * (turns - first_turns)  # one example per later turn
    for record in records:
        messages = record["messages"]
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"
        roles = [m["role"] for m in messages[1:]]
        assert all(a != b for a, b in zip(roles, roles[1:]))  # the speakers alternate
        assert not any(re.match(r"[*\s]*User [12]\s*:", m["content"]) for m in messages)
        assert all(m["content"] for m in messages)
    first = rows[0]
    assert records[0]["messages"][0]["content"] == " ".join(first["user 2 personas"].split("\n"))  # turn 1: User 2
    assert records[1]["messages"][0]["content"] == " ".join(first["user 1 personas"].split("\n"))
    example = tokenize_example(records[5], tokenizer)
    assert _response_texts(example, tokenizer) == [records[5]["messages"][-1]["content"] + "<|end|>"]


def test_template_that_rewrites_earlier_turns_trains_on_the_last_answer(tokenizer):
    rewriting = copy.deepcopy(tokenizer)  # like templates that drop the reasoning of earlier turns
    rewriting.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ '<|assistant|>' + m['content'] | upper + '<|end|>' }}"
        "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    with pytest.warns(UserWarning, match="only the final assistant message"):
        example = tokenize_example(MULTI_TURN, rewriting)
    assert _response_texts(example, tokenizer) == ["Green, then red.<|end|>"]


def test_validate_records_names_the_record():
    validate_records([{"prompt": "a", "completion": "b"}], "mine")
    with pytest.raises(ValueError, match=r"mine: record 2 is in no known format.*\['prompt'\]"):
        validate_records([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "mine")
    with pytest.raises(ValueError, match=r"mine: line 7 is in no known format.*got keys list"):
        validate_records([[1, 2]], "mine", lines=[7])
    with pytest.raises(ValueError, match="record 1: message 1 must be a dict"):
        validate_records([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}], "m")
    with pytest.raises(ValueError, match="'nothing' is empty"):
        validate_records([], "nothing")


def test_load_records_turns_datasets_errors_into_one_line(tmp_path, monkeypatch):
    import gzip

    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # load_dataset caches there
    pc, chat = {"prompt": "a", "completion": "b"}, {"messages": [{"role": "user", "content": "hi"}]}
    same = tmp_path / "same"
    same.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (same / name).write_text(json.dumps(pc) + "\n")
    assert load_records(same) == [pc, pc]  # a directory of files in one format loads
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text(json.dumps(chat) + "\n")
    (mixed / "b.jsonl").write_text(json.dumps(pc) + "\n")
    with pytest.raises(ValueError, match=r"data directory .*mixed: its data files must share one record format"
                                         r".*could not combine them: there are 2 new columns"):
        load_records(mixed)
    empty_file = tmp_path / "empty_file"
    empty_file.mkdir()
    (empty_file / "a.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"data directory .*empty_file could not be loaded by datasets.load_dataset "
                                         r"\(StopIteration, an empty data file\?\)"):
        load_records(empty_file)
    no_data = tmp_path / "no_data"
    no_data.mkdir()
    (no_data / "notes.xyz").write_text("hello\n")
    with pytest.raises(ValueError, match=r"no_data could not be loaded by datasets.load_dataset \(DataFilesNotFound"):
        load_records(no_data)
    not_gzip = tmp_path / "data.jsonl.gz"
    not_gzip.write_text(json.dumps(pc) + "\n")
    with pytest.raises(ValueError, match=r"data file .*data.jsonl.gz could not be read \(BadGzipFile"):
        load_records(not_gzip)
    cut_gzip = tmp_path / "cut.jsonl.gz"
    cut_gzip.write_bytes(gzip.compress((json.dumps(pc) + "\n").encode() * 50)[:40])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz could not be read \(EOFError"):
        load_records(cut_gzip)


def test_a_truncated_persona_chat_csv_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "short.csv"  # e.g. `head -n 4` cutting a quoted multi-line field
    path.write_text("user 1 personas,user 2 personas,Best Generated Conversation\nI like cats.\n")
    with pytest.raises(ValueError, match=r"row 0 \(0-based\) has no value for \['user 2 personas'"):
        convert_persona_chat(path)


HUMANEVAL = [{"task_id": "HumanEval/0", "entry_point": "double",
              "prompt": 'def double(x: int) -> int:\n    """Twice x."""\n', "canonical_solution": "    return 2 * x\n",
              "test": "def check(candidate):\n    assert candidate(2) == 4\n"},
             {"task_id": "HumanEval/1", "entry_point": "neg", "prompt": "def neg(x):\n",
              "canonical_solution": "    return -x\n", "test": "def check(candidate):\n    assert candidate(1) == -1\n"}]
MBPP = [{"task_id": 2, "prompt": "Write a function that returns the first item.", "code": "def first(xs):\n    return xs[0]",
         "test_imports": [], "test_list": ["assert first([3, 4]) == 3"]}]


def test_humaneval_and_mbpp_files_are_prompt_completion_examples(tmp_path, tokenizer):
    """The files `sfr eval code` reads: the prompt it gives a base model, the reference solution as completion."""
    import gzip

    from sfr.eval.code import build_prompt, load_problems

    humaneval = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(humaneval, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in HUMANEVAL))
    mbpp = tmp_path / "sanitized-mbpp.json"
    mbpp.write_text(json.dumps(MBPP))
    for path, raw in ((humaneval, HUMANEVAL), (mbpp, MBPP)):
        records = load_records(path)
        problems = load_problems(path)
        assert [r["prompt"] for r in records] == [build_prompt(p, "completion") for p in problems]
        assert [r["completion"] for r in records] == [r.get("canonical_solution") or r["code"] for r in raw]
        assert [r["task_id"] for r in records] == [str(r["task_id"]) for r in raw]
    assert records[0]["prompt"].startswith("You are an expert Python programmer") and "[BEGIN]" in records[0]["prompt"]
    example = tokenize_example(load_records(humaneval)[0], tokenizer)
    assert _response_texts(example, tokenizer)[0].startswith("    return 2 * x")  # the loss is on the solution
    unsolved = tmp_path / "unsolved.jsonl"
    unsolved.write_text(json.dumps({k: v for k, v in HUMANEVAL[0].items() if k != "canonical_solution"}) + "\n")
    with pytest.raises(ValueError, match=r"unsolved.jsonl: code problem 'HumanEval/0' has no reference solution "
                                         r"\('canonical_solution'\) to train on"):
        load_records(unsolved)
