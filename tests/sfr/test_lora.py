"""LoRA backbones (peft): adapters train, the base weights stay, the output holds the adapter, the head and,
with merge_lora, a merged plain model that computes what the adapted model computes; exact resume."""
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import StopAt, make_args, one_thread, tiny_backbone, tiny_dataset  # noqa: F401  (one_thread: an autouse fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from sfr.head import load_flow_head
from sfr.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGED_DIR, apply_lora
from sfr.model import SFRModel, find_decoder
from sfr.train import train

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved with the embedded tokenizer: a model path as `sfr train --model` takes it."""
    from sfr.tiny_lm import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    folder = tmp_path_factory.mktemp("base")
    tiny_backbone(seed=5, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _lora_args(out, **overrides):
    return make_args(out, **{**dict(max_steps=3, lora_r=4, learning_rate=0.05, phase_a_steps=0, ramp_steps=1),
                             **overrides})


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_run_writes_the_adapter_the_head_and_a_merged_model(tmp_path, base_dir):
    out = tmp_path / "run"
    result = train(_lora_args(out, merge_lora=True), model=str(base_dir), data=tiny_dataset())
    assert result.global_step == 3
    assert (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file()
    assert not (out / "model.safetensors").exists()  # the adapter, not a copy of the base model
    adapter = load_file(out / ADAPTER_WEIGHTS)
    assert adapter and all("lora_" in key for key in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # lora_B starts at 0: it trained
    head, _ = load_flow_head(out / "sfr_head")
    assert head.out.weight.abs().max() > 0  # zero-initialised, trained in full

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = _logits(base, ids)
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out))
    after = _logits(adapted, ids)
    assert (after - before).abs().max() > 1e-4  # the adapter changes the model
    merged = AutoModelForCausalLM.from_pretrained(out / MERGED_DIR)
    torch.testing.assert_close(_logits(merged, ids), after, rtol=1e-4, atol=1e-5)
    assert (out / MERGED_DIR / "sfr_head" / "model.safetensors").is_file()
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(base_dir), ids), before)  # base untouched


def test_lora_freezes_the_backbone_and_reaches_its_hidden_states(base_dir):
    backbone = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), r=2, target_modules="q_proj,v_proj")
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and ("q_proj" in name or "v_proj" in name) for name in trainable)
    model = SFRModel.from_backbone(backbone, 8)
    assert find_decoder(backbone) is backbone.get_base_model().model  # the LlamaModel, through the wrapper
    assert model.hidden_size == 32 and all(p.requires_grad for p in model.head.parameters())


def test_lora_run_resumes_exactly(tmp_path, base_dir):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="constant")
    train(_lora_args(tmp_path / "whole", **common), model=str(base_dir), data=tiny_dataset())
    train(_lora_args(tmp_path / "cut", **common), model=str(base_dir), data=tiny_dataset(), callbacks=[StopAt(2)])
    train(_lora_args(tmp_path / "cut", resume_from_checkpoint="latest", **common), model=str(base_dir),
          data=tiny_dataset())
    for weights in (ADAPTER_WEIGHTS, "sfr_head/model.safetensors"):  # the adapters' init is seeded too
        whole, resumed = (load_file(tmp_path / run / weights) for run in ("whole", "cut"))
        assert whole.keys() == resumed.keys()
        for key, value in whole.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_merge_lora_needs_lora(tmp_path):
    with pytest.raises(ValueError, match="merge_lora needs LoRA"):
        make_args(tmp_path, merge_lora=True)
    with pytest.raises(ValueError, match="lora_r"):
        make_args(tmp_path, lora_r=0)
