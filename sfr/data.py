"""Loading dialogue data and tokenising it with completion-only labels.

Record formats (the TRL ones):

* **messages**: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``;
  the persona/instructions go in the system message; the loss is on every assistant turn. An optional
  top-level ``"train_on": "last"`` restricts it to the final assistant message (earlier assistant
  turns are then context; :func:`convert_persona_chat` writes this).
* **prompt-completion**: ``{"prompt": ..., "completion": ...}``, both strings (wrapped as one user
  turn and one assistant turn when the tokenizer has a chat template, plain ``prompt + completion +
  eos`` otherwise) or both message lists (conversational; the loss is on the completion's assistant
  turns).

* **code problems**: HumanEval (``task_id, prompt, entry_point, test, canonical_solution``) and MBPP
  (``task_id, prompt`` or ``text``, ``test_list``, ``code``) records, the files ``sfr eval code`` reads,
  become prompt-completion examples (:func:`code_problems_as_examples`): the completion-style prompt
  ``sfr eval code`` gives a base model and the reference solution.

Sources (:func:`load_records`): a ``.jsonl`` file (``.jsonl.gz`` too), a ``.json`` file holding a
list, a Synthetic-Persona-Chat ``.csv`` (converted by :func:`convert_persona_chat`), a directory
written by ``datasets``' ``save_to_disk`` or holding data files, or a ``datasets`` hub name (needs the
network or the local hub cache).

Labels follow the Hugging Face convention (:func:`tokenize_example`): ``labels[i] = input_ids[i]`` on
response tokens (the assistant content plus whatever the chat template emits after it, e.g. the
end-of-turn token) and ``-100`` elsewhere, *unshifted* (the model shifts them).
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
import warnings
from pathlib import Path

from sfr.checks import check_int

IGNORE_INDEX = -100
PERSONA_CHAT_COLUMNS = ("user 1 personas", "user 2 personas", "Best Generated Conversation")
# "User 1: text", also markdown bold as the CSV has it: "* * User 1: * * text"
_TURN_PREFIX = re.compile(r"^[*\s]*User ([12])\s*:[*\s]*(.*)$")
_STAGE_DIRECTION = re.compile(r"^(?:\[.*\]|\(.*\)|[*_=~-][*_=~\s-]*)$")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".gz", ".parquet", ".arrow")


def record_format(record) -> str | None:
    """``"messages"``, ``"prompt_completion"`` or ``None`` when ``record`` is in no known format."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return "messages"
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return "prompt_completion"
    if isinstance(prompt, list) and isinstance(completion, list):
        return "prompt_completion"
    return None


def load_records(path_or_name, split: str = "train") -> list[dict]:
    """Load and validate the records of a file, a ``datasets`` directory or a hub data set.

    Raises ``FileNotFoundError`` naming a missing path, ``ValueError`` naming the line of malformed
    JSON or of a record in no known format (with the keys seen), and ``ValueError`` for an empty set,
    a file that does not read (not gzip, not UTF-8, ...) or a directory that ``datasets`` cannot load
    (e.g. files of different record formats, which it cannot combine into one table).
    ``split`` picks the split of a ``DatasetDict`` / hub data set.
    """
    if path_or_name is None or str(path_or_name).strip() == "":
        raise ValueError("data must be a file, a datasets directory or a data set name, got nothing")
    path = Path(path_or_name).expanduser()
    if path.exists():
        if path.is_dir():
            records, lines = _load_dataset_dir(path, split), None
        else:
            try:
                records, lines = _load_file(path)
            except (OSError, EOFError, UnicodeDecodeError) as error:  # unreadable, not gzip, not UTF-8, ...
                raise ValueError(f"data file {path} could not be read ({type(error).__name__}: {error})") from None
    elif _looks_like_path(str(path_or_name)):
        raise FileNotFoundError(f"data file not found: {path}")
    else:
        records, lines = _load_hub_dataset(str(path_or_name), split), None
    records = code_problems_as_examples(records, str(path_or_name))
    validate_records(records, str(path_or_name), lines)
    return records


def code_problems_as_examples(records: list, source: str) -> list:
    """``records`` with every HumanEval / MBPP problem (the formats ``sfr eval code`` reads) replaced by a
    prompt/completion example: the problem's completion-style prompt and its reference solution
    (:func:`sfr.eval.code.training_example`); other records unchanged. ``ValueError`` naming ``source``
    for a problem without a reference solution."""
    if all(record_format(record) is not None for record in records):
        return records
    from sfr.eval.code import code_problem, training_example

    converted = []
    for record in records:
        problem = code_problem(record) if isinstance(record, dict) and record_format(record) is None else None
        try:
            converted.append(record if problem is None else training_example(problem))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
    return converted


def validate_records(records, source: str, lines: list[int] | None = None) -> None:
    """Raise ``ValueError`` for an empty list, or naming the first record in no known format (its
    line in ``source`` when ``lines`` gives them, else ``record i``, 1-based, and the keys seen) or
    holding a message that is not ``{"role": str, "content": str}``."""
    if not records:
        raise ValueError(f"data set {source!r} is empty (no records)")
    for index, record in enumerate(records):
        where = f"{source}: line {lines[index]}" if lines else f"{source}: record {index + 1}"
        if record_format(record) is None:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where} is in no known format: expected {{'messages': [...]}} or "
                             f"{{'prompt': ..., 'completion': ...}}, got keys {keys}")
        _check_messages(record, where)


def convert_persona_chat(csv_path) -> list[dict]:
    """Synthetic-Persona-Chat CSV -> messages records, one per turn.

    Columns ``user 1 personas``, ``user 2 personas`` (one persona sentence per line) and ``Best
    Generated Conversation`` (turns on lines prefixed ``User 1:`` / ``User 2:``, also in the markdown
    form ``**User 1:**``; see :func:`_parse_turns` for the other lines). For every turn ``k >= 1`` of a
    speaker X, one record: the system message is X's persona sentences (joined by spaces), turns
    ``0 .. k-1`` are context (X's own turns as ``assistant``, the other speaker's as ``user``) and turn
    ``k`` is the final assistant message, the only one trained on (``"train_on": "last"``). Turn 0 has
    no previous turn to reply to and gets no record (``sfr eval`` reads the same records as prompts).
    Extra keys: ``persona`` (the system text), ``conversation`` (row index), ``turn`` (k), ``speaker``.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"persona-chat CSV not found: {path}")
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PERSONA_CHAT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} is not a Synthetic-Persona-Chat CSV: missing columns {missing}, "
                             f"found {reader.fieldnames}")
        for row_index, row in enumerate(reader):
            short = [c for c in PERSONA_CHAT_COLUMNS if row.get(c) is None]  # csv leaves missing fields None
            if short:
                raise ValueError(f"{path}: data row {row_index} (0-based) has no value for {short} "
                                 f"(a truncated file, or an unclosed quoted field?)")
            personas = {speaker: " ".join(line.strip() for line in row[f"user {speaker} personas"].splitlines()
                                          if line.strip()) for speaker in ("1", "2")}
            turns = _parse_turns(row["Best Generated Conversation"])
            for k, (speaker, text) in enumerate(turns[1:], start=1):
                context = [{"role": "assistant" if s == speaker else "user", "content": t} for s, t in turns[:k]]
                records.append({
                    "messages": [{"role": "system", "content": personas[speaker]}, *context,
                                 {"role": "assistant", "content": text}],
                    "train_on": "last", "persona": personas[speaker], "conversation": row_index,
                    "turn": k, "speaker": f"User {speaker}",
                })
    return records


def is_persona_chat_csv(path) -> bool:
    """Whether ``path`` is a CSV whose header has the Synthetic-Persona-Chat columns."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return all(c in header for c in PERSONA_CHAT_COLUMNS)


def tokenize_example(record: dict, tokenizer, max_length: int | None = None) -> dict:
    """Tokenise one record with ``tokenizer``'s chat template; completion-only labels.

    Returns ``{"input_ids": list[int], "labels": list[int]}`` of equal length (at most ``max_length``:
    longer examples are cut at the end). ``labels`` is ``input_ids`` on response tokens and -100
    elsewhere. How: render the conversation to text; the response span of assistant turn ``i`` is the
    text between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])``;
    a token is a response token when its first character lies in a response span (offsets of a fast
    tokenizer; slow tokenizers tokenise the pieces separately). Templates that re-render earlier turns
    differently (so those renders are not prefixes of the whole) fall back to training on the final
    assistant message only.
    """
    fmt = record_format(record)
    if fmt is None:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"record is in no known format (messages or prompt/completion), got keys {keys}")
    check_int("max_length", max_length, 2, optional=True)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if fmt == "prompt_completion" and isinstance(record["prompt"], str) and not has_template:
        text, spans = _plain_prompt_completion(record, tokenizer)
    else:
        if not has_template:
            raise ValueError("the tokenizer has no chat template; messages records need one "
                             "(use a chat/instruct model or set tokenizer.chat_template)")
        if fmt == "messages":
            messages = record["messages"]
            trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if record.get("train_on", "all") == "last":
                trained = trained[-1:] if trained and trained[-1] == len(messages) - 1 else []
        elif isinstance(record["prompt"], str):
            messages = [{"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record["completion"]}]
            trained = [1]
        else:
            messages = list(record["prompt"]) + list(record["completion"])
            trained = [i for i in range(len(record["prompt"]), len(messages)) if messages[i]["role"] == "assistant"]
        text, spans = _chat_spans(messages, trained, tokenizer)
    input_ids, labels = _tokenize_with_spans(text, spans, tokenizer)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


# ----------------------------------------------------------------------------------------------
def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_spans(messages, trained, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    full = _render(tokenizer, messages, False)
    spans = []
    for i in trained:
        start_text = _render(tokenizer, messages[:i], True)
        end_text = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(end_text) and end_text.startswith(start_text)):
            spans = None
            break
        spans.append((len(start_text), len(end_text)))
    if spans is None:  # the template rewrites earlier turns: train on the final assistant message only
        warnings.warn("the chat template renders earlier turns differently inside a longer conversation "
                      "(e.g. it strips their reasoning), so only the final assistant message is trained on",
                      UserWarning, stacklevel=3)
        spans = []
        if messages and messages[-1]["role"] == "assistant":
            start_text = _render(tokenizer, messages[:-1], True)
            if not full.startswith(start_text):
                raise ValueError("the chat template's rendering of the conversation without its last "
                                 "message is not a prefix of the whole; cannot locate the response")
            spans.append((len(start_text), len(full)))
    return full, spans


def _plain_prompt_completion(record, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    prefix = (tokenizer.bos_token or "") if getattr(tokenizer, "add_bos_token", False) else ""
    eos = tokenizer.eos_token or ""
    text = prefix + record["prompt"] + record["completion"] + eos
    return text, [(len(prefix) + len(record["prompt"]), len(text))]


def _tokenize_with_spans(text: str, spans, tokenizer) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "is_fast", False):
        # verbose=False: max_length truncation is ours, not the model_max_length warning's concern
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        input_ids = list(encoded["input_ids"])
        labels = [IGNORE_INDEX] * len(input_ids)
        for j, (char_start, _char_end) in enumerate(encoded["offset_mapping"]):
            if any(lo <= char_start < hi for lo, hi in spans):
                labels[j] = input_ids[j]
        return input_ids, labels
    input_ids, labels, cursor = [], [], 0
    for lo, hi in sorted(spans):  # slow tokenizer: tokenise context and response pieces separately
        for piece, trained in ((text[cursor:lo], False), (text[lo:hi], True)):
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        cursor = hi
    ids = tokenizer(text[cursor:], add_special_tokens=False)["input_ids"] if text[cursor:] else []
    return input_ids + ids, labels + [IGNORE_INDEX] * len(ids)


def _parse_turns(conversation: str) -> list[tuple[str, str]]:
    """``"User 1: hi\nUser 2: hello"`` -> ``[("1", "hi"), ("2", "hello")]``.

    An unprefixed line continues the previous turn, except stage directions (``[User 2 shows a
    photo]``, ``(later)``, ``* * *``), which are dropped. A conversation without any prefix (a few
    rows) is read as one turn per non-empty line, User 1 first, alternating. Empty turns are dropped
    and consecutive turns of the same speaker merged, so the speakers alternate (the raw data repeats
    a speaker after a scene break now and then).
    """
    lines = [line.strip() for line in conversation.splitlines()]
    turns: list[list[str]] = []
    if any(_TURN_PREFIX.match(line) for line in lines):
        for line in lines:
            match = _TURN_PREFIX.match(line)
            if match:
                turns.append([match.group(1), match.group(2).strip()])
            elif line and turns and not _STAGE_DIRECTION.match(line):
                turns[-1][1] = f"{turns[-1][1]} {line}".strip()
    else:
        spoken = [line for line in lines if line and not _STAGE_DIRECTION.match(line)]
        turns = [["12"[i % 2], line] for i, line in enumerate(spoken)]
    merged: list[tuple[str, str]] = []
    for speaker, text in turns:
        if not text:
            continue
        if merged and merged[-1][0] == speaker:
            merged[-1] = (speaker, f"{merged[-1][1]} {text}")
        else:
            merged.append((speaker, text))
    return merged


def _check_messages(record, where: str) -> None:
    lists = [record["messages"]] if "messages" in record and isinstance(record["messages"], list) else [
        v for v in (record.get("prompt"), record.get("completion")) if isinstance(v, list)]
    for messages in lists:
        for j, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise ValueError(f"{where}: message {j} must be a dict with string 'role' and 'content', "
                                 f"got {message!r:.120}")


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith(".") or text.lower().endswith(_DATA_SUFFIXES) or (
        os.altsep is not None and os.altsep in text)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def excerpt(line: str, at: int, before: int = 50, after: int = 20) -> str:
    """The part of ``line`` around position ``at`` (where a parser gave up), for an error message:
    mostly what comes before it, since the fault (a missing quote or comma) lies at or before that
    point; "…" marks a cut."""
    line = line.rstrip("\r\n")
    start, end = max(0, at - before), min(len(line), at + after)
    return ("…" if start > 0 else "") + line[start:end] + ("…" if end < len(line) else "")


def _json_error(source, where: str, line: str, error: json.JSONDecodeError) -> ValueError:
    complaint = error.msg.removesuffix(" at")  # "Unterminated string starting at", ...
    return ValueError(f"{source}: {where} ({complaint}): {excerpt(line, error.colno - 1)}")


def parse_json_lines(lines, source) -> tuple[list, list[int]]:
    """The records of JSON lines (blank lines skipped) and the 1-based line number of each.

    A line that is not JSON is a ``ValueError`` naming ``source``, the line number, the parser's
    complaint and an excerpt of the line up to where the parser gave up (rather than a column number).
    """
    records, line_numbers = [], []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise _json_error(source, f"line {line_number} is not valid JSON", line, error) from None
        line_numbers.append(line_number)
    return records, line_numbers


def parse_json(text: str, source):
    """``json.loads(text)``; invalid JSON is a ``ValueError`` naming ``source``, the line where the
    parser gave up, its complaint and an excerpt of that line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        lines = text.splitlines()
        line = lines[error.lineno - 1] if error.lineno <= len(lines) else ""
        raise _json_error(source, f"invalid JSON near line {error.lineno}", line, error) from None


def _load_file(path: Path) -> tuple[list, list[int] | None]:
    """The records of a data file and, for JSONL, the line number of each (None otherwise)."""
    name = path.name.lower()
    if name.endswith(".csv"):
        if is_persona_chat_csv(path):
            return convert_persona_chat(path), None
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f)), None
    if name.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(path) as f:
            return parse_json_lines(f, path)
    if name.endswith((".json", ".json.gz")):
        with _open_text(path) as f:
            data = parse_json(f.read(), path)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}")
        return data, None
    if name.endswith((".parquet", ".arrow")):
        import datasets

        builder = "parquet" if name.endswith(".parquet") else "arrow"
        return datasets.load_dataset(builder, data_files=str(path), split="train").to_list(), None
    raise ValueError(f"data file {path} has an unknown type: expected .jsonl, .json, .csv, .parquet or .arrow")


def _load_dataset_dir(path: Path, split: str) -> list[dict]:
    import datasets

    saved = any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))
    try:
        loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    except Exception as error:  # datasets' own errors would escape as tracebacks: say what went wrong here
        raise ValueError(_dataset_dir_error(path, saved, error)) from error
    return _pick_split(loaded, split, str(path)).to_list()


def _dataset_dir_error(path: Path, saved: bool, error: Exception) -> str:
    from datasets.table import CastError

    cause = error.__cause__ if isinstance(error.__cause__, Exception) else error  # DatasetGenerationError wraps it
    text = " ".join(str(cause).split())[:300]  # one line
    if isinstance(cause, CastError) or text.startswith("Schema at index"):  # JSON and CSV files of other columns
        reason = cause.details() if isinstance(cause, CastError) else text
        return (f"data directory {path}: its data files must share one record format (all messages or all "
                f"prompt/completion, with the same keys); datasets could not combine them: {reason}")
    reason = f"{type(cause).__name__}: {text}" if text else f"{type(cause).__name__}, an empty data file?"
    loader = "datasets.load_from_disk" if saved else "datasets.load_dataset"
    return f"data directory {path} could not be loaded by {loader} ({reason})"


def _load_hub_dataset(name: str, split: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:  # offline, unknown name, ...: say what was tried
        raise ValueError(f"could not load data set {name!r}: it is not an existing file or directory, and "
                         f"datasets.load_dataset failed ({type(error).__name__}: {error})") from error
    return _pick_split(loaded, split, name).to_list()


def _pick_split(loaded, split: str, name: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"data set {name!r} has no split {split!r}; splits: {sorted(loaded)}")
        return loaded[split]
    return loaded
