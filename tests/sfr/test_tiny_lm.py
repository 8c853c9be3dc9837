import json

import pytest
import torch

from sfr.corpus import build_corpus
from sfr.tiny_lm import (
    DEFAULT_MODEL,
    VOCAB_SIZE,
    build_model,
    build_tokenizer,
    default_model_path,
    resolve_model_name_or_path,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model built once per session into a shared temporary SFR_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFR_CACHE", str(tmp_path_factory.getbasetemp() / "sfr-cache"))
        yield default_model_path()


def test_default_model_loads_with_auto_classes(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.9e6 <= n_params <= 1.2e6  # "about 1.0M parameters" (the module docstring)
    assert model.config.vocab_size >= len(tokenizer)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|end|>" and tokenizer.bos_token == "<|bos|>"
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert list(model_dir.parent.glob("*.tmp-*")) == []  # the atomic build cleaned up

    record = build_corpus("train")[0]
    text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert text == ("<|bos|><|system|>" + record["messages"][0]["content"] + "<|end|><|user|>"
                    + record["messages"][1]["content"] + "<|end|><|assistant|>" + record["messages"][2]["content"]
                    + "<|end|>")
    prompt = tokenizer.apply_chat_template(record["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|><|assistant|>")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for role in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert tokenizer.convert_tokens_to_ids(role) in ids  # role tokens are atomic
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith(record["messages"][2]["content"])
    assert len(ids) < 80  # the BPE learnt the corpus: far fewer tokens than bytes

    with torch.no_grad():
        out = model(torch.tensor([ids]), labels=torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), model.config.vocab_size)
    assert abs(out.loss.item() - torch.log(torch.tensor(float(model.config.vocab_size))).item()) < 1.0  # random init


def test_resolve_model_name(model_dir):
    assert resolve_model_name_or_path(None) == str(model_dir)
    assert resolve_model_name_or_path(DEFAULT_MODEL) == str(model_dir)
    assert resolve_model_name_or_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id stays as it is
    local = model_dir.parent / "copy"  # a local directory becomes absolute (it still loads from elsewhere)
    local.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(model_dir.parent)
        assert resolve_model_name_or_path("copy") == str(local.resolve())
    with pytest.raises(TypeError, match="model name"):
        resolve_model_name_or_path(3)


def test_cached_build_is_reused_and_init_is_deterministic(model_dir):
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert default_model_path() == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    first, second = build_tokenizer(), build_tokenizer()  # the BPE training is deterministic
    assert first.get_vocab() == second.get_vocab() and len(first) <= VOCAB_SIZE
    a, b = build_model(vocab_size=100), build_model(vocab_size=100)
    assert a.config.vocab_size == 128  # padded to a multiple of 64
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
