"""sfr.streaming: the streamed prepare writes the rows of the in-memory one, chunk by chunk, on one or two
encoder processes, and is a cache hit the second time."""
import json

import numpy as np
import pytest

from sfr.corpus import build_corpus
from sfr.streaming import SegmentCache, prepare_streaming
from sfr.targets import prepare


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    records = build_corpus("train")[::18][:20] * 2  # 20 records over the personas and prompts, twice
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rows(dataset):
    return [dict(row) for row in dataset]


@pytest.fixture(scope="module")
def in_memory(corpus_file, tmp_path_factory):
    return prepare(corpus_file, tmp_path_factory.mktemp("memory") / "t", progress=False)


def test_streamed_rows_equal_the_in_memory_ones_across_chunks_and_cache_evictions(corpus_file, in_memory, tmp_path):
    streamed = prepare_streaming(corpus_file, tmp_path / "s", chunk_records=7, cache_segments=5, progress=False)
    assert not streamed.cache_hit and len(streamed.dataset) == len(in_memory.dataset) == 40
    for key in ("examples", "anchors", "skipped_without_response", "examples_without_anchors"):
        assert streamed.metadata["counts"][key] == in_memory.metadata["counts"][key], key
    # A cache of 5 texts forgets the first 20 records' segments before they come again: they are encoded again.
    assert streamed.metadata["counts"]["unique_segments"] > in_memory.metadata["counts"]["unique_segments"]
    for got, want in zip(_rows(streamed.dataset), _rows(in_memory.dataset)):
        targets = np.asarray(got.pop("anchor_targets")), np.asarray(want.pop("anchor_targets"))
        assert got == want
        np.testing.assert_allclose(*targets, atol=1e-6)
    assert streamed.metadata["streaming"]["peak_rss_mb_streaming"] > 0
    again = prepare_streaming(corpus_file, tmp_path / "s", chunk_records=7, cache_segments=5, progress=False)
    assert again.cache_hit


def test_two_encoder_and_two_tokeniser_processes_give_the_same_rows(corpus_file, in_memory, tmp_path):
    streamed = prepare_streaming(corpus_file, tmp_path / "pool", encode_devices=["cpu", "cpu"], chunk_records=8,
                                 num_proc=2, progress=False)  # and two tokenising workers, 5 chunks in order
    assert streamed.metadata["throughput"]["device"] == "cpu,cpu"
    assert streamed.metadata["throughput"]["tokenize_segment_processes"] == 2
    for got, want in zip(_rows(streamed.dataset), _rows(in_memory.dataset)):
        targets = np.asarray(got.pop("anchor_targets")), np.asarray(want.pop("anchor_targets"))
        assert got == want
        np.testing.assert_allclose(*targets, atol=1e-5)


def test_a_bad_record_and_a_non_json_source_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="no known format"):
        prepare_streaming(bad, tmp_path / "out", progress=False)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="JSON/JSONL"):
        prepare_streaming(tmp_path / "data.csv", tmp_path / "out2", progress=False)


def test_segment_cache_encodes_only_what_it_lacks_and_keeps_the_most_recent():
    cache, calls = SegmentCache(2), []

    def encode(texts):
        calls.append(list(texts))
        return np.arange(len(texts) * 2, dtype=np.float32).reshape(len(texts), 2) + 10 * len(calls)

    found, encoded = cache.embed(["a", "b", "a"], encode)
    assert encoded == 2 and calls == [["a", "b"]] and sorted(found) == ["a", "b"]
    found, encoded = cache.embed(["a"], encode)  # cached: now the most recent
    assert encoded == 0 and len(calls) == 1
    found, encoded = cache.embed(["c", "a"], encode)  # "b" is the least recent: it leaves
    assert encoded == 1 and list(cache.entries) == ["a", "c"] and sorted(found) == ["a", "c"]
