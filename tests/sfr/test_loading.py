"""sfr.loading: the attention choice and the one model loader."""
import pytest
import torch

from sfr.loading import attention_implementation, load_model_and_tokenizer


def test_attention_is_flash_attention_2_only_where_it_can_run(monkeypatch):
    import transformers.utils

    assert attention_implementation("eager", half_precision=True) == "eager"  # an explicit choice wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert attention_implementation(None, half_precision=True) == "flash_attention_2"
    assert attention_implementation(None, half_precision=False) == "sdpa"  # flash-attn has no float32 kernels
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert attention_implementation(None, half_precision=True) == "sdpa"


def test_the_tiny_lm_loads_by_name_in_the_asked_mode_dtype_and_device():
    model, tokenizer = load_model_and_tokenizer("sfr-tiny")
    assert not model.training and next(model.parameters()).dtype == torch.float32  # as from_pretrained gives it
    again, _ = load_model_and_tokenizer(None, device="cpu", dtype=torch.float64)
    assert next(again.parameters()).dtype == torch.float64
    assert next(again.parameters()).device == torch.device("cpu")
    assert len(tokenizer) <= model.get_input_embeddings().num_embeddings  # the tokenizer of this model
    ids = torch.tensor([tokenizer("hello there")["input_ids"]])
    torch.testing.assert_close(again(ids).logits.float(), model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_missing_model_is_an_oserror_that_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(OSError, match=f"^cannot load model '{missing}': directory {missing} does not exist$"):
        load_model_and_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="cannot load model .*empty"):
        load_model_and_tokenizer(tmp_path / "empty", attn_implementation="sdpa")


def test_a_cached_hub_model_loads_from_its_snapshot_when_the_hub_cannot_be_reached(hub):
    from sfr.loading import local_copy
    from sfr.tiny_lm import default_model_path

    snapshot = hub.cache("org/tiny", source=default_model_path())
    assert local_copy("org/tiny") == "org/tiny"  # offline mode: from_pretrained reads the cache itself
    hub.unreachable()
    assert local_copy("org/tiny") == str(snapshot)  # not minutes of retries first
    model, tokenizer = load_model_and_tokenizer("org/tiny")
    assert model.name_or_path == str(snapshot) and len(tokenizer) <= model.config.vocab_size
    assert local_copy("org/elsewhere") == "org/elsewhere"  # not cached: the check reports it
    hub.online()
    hub.cache("org/there")
    assert local_copy("org/there") == "org/there"  # the hub answers: from_pretrained may check for updates
