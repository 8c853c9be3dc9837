"""sfr.integrations.trl: SFRSFTTrainer as a drop-in for trl.SFTTrainer on the embedded tiny LM (CPU)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from tiny_models import one_thread  # noqa: F401  (an autouse fixture)

from sfr.corpus import build_corpus
from sfr.tiny_lm import default_model_path

trl = pytest.importorskip("trl")
from sfr.integrations.trl import SFRSFTConfig, SFRSFTTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def _config(cls, out, **overrides):
    settings = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=3)
    return cls(**{**settings, **overrides})


@pytest.fixture(scope="module")
def chats():
    return Dataset.from_list(build_corpus("train", examples_per_pair=1)[:24])


def test_drop_in_with_a_plain_sftconfig_trains_the_same_ce_and_adds_sfr(tmp_path, chats):
    """Same config object, data and model as SFTTrainer: the first step's CE is SFTTrainer's loss (same
    tokenisation and labels), SFR's loss and lambda are logged, and the run saves the model, the head and
    sfr_run.json."""
    model = str(default_model_path())
    plain = trl.SFTTrainer(model=model, args=_config(trl.SFTConfig, tmp_path / "sft"), train_dataset=chats)
    plain.train()
    sfr = SFRSFTTrainer(model=model, args=_config(trl.SFTConfig, tmp_path / "sfr"), train_dataset=chats)
    assert isinstance(sfr, trl.SFTTrainer) and sfr.args.phase_a_steps == 100  # SFR's defaults joined the config
    sfr.train()
    sfr.save_model()
    first_sft = next(h for h in plain.state.log_history if "loss" in h)
    first_sfr = next(h for h in sfr.state.log_history if "loss" in h)
    assert first_sfr["ce_loss"] == pytest.approx(first_sft["loss"], rel=1e-4)
    assert first_sfr["sfr_lambda"] == 0 and first_sfr["sfr_loss"] > 0.5  # phase A; unit-variance source noise
    assert first_sfr["loss"] == pytest.approx(first_sfr["ce_loss"] + first_sfr["sfr_loss"], rel=1e-4)
    out = tmp_path / "sfr"
    assert (out / "model.safetensors").is_file() and (out / "sfr_head" / "model.safetensors").is_file()
    record = json.loads((out / "sfr_run.json").read_text())
    assert record["objective"] == "sfr" and record["sfr_loss_backend"] in ("torch", "triton") and record["observed"]


def test_prompt_completion_anchors_lie_in_the_completions_and_targets_embed_their_segments(tmp_path):
    from sfr.encoder import load_encoder

    records = [{"prompt": f"Question {i}: what do you like?", "completion": f" I like {w} a lot, and I say so "
                f"every day of the week."} for i, w in enumerate(["tea", "rain", "maps", "jazz"])]
    trainer = SFRSFTTrainer(model=str(default_model_path()), train_dataset=Dataset.from_list(records),
                            args=_config(SFRSFTConfig, tmp_path, anchor_stride=4, segment_tokens=8))
    tokenizer = trainer.processing_class
    encoder = load_encoder()
    anchors = 0
    for row in trainer.train_dataset:
        assert row["anchor_positions"], "every completion is long enough for an anchor"
        for t, end, target in zip(row["anchor_positions"], row["anchor_segment_ends"], row["anchor_targets"]):
            assert row["labels"][t + 1] != -100 and all(label != -100 for label in row["labels"][t + 1:end])
            text = tokenizer.decode(row["input_ids"][t + 1:end], skip_special_tokens=True).strip()
            want = encoder.encode([text], normalize_embeddings=True)[0]
            assert float(np.dot(want, np.asarray(target))) > 0.999
            anchors += 1
    assert anchors >= 8 and row["labels"][0] == -100  # the prompt is not trained (TRL's completion-only loss)


def test_lora_through_peft_config_and_the_example(tmp_path):
    spec = importlib.util.spec_from_file_location("trl_sft_example", REPO / "examples" / "trl_sft.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    last = example.main(str(tmp_path / "example"), max_steps=2, examples=16)
    assert {"ce_loss", "sfr_loss", "sfr_lambda"} <= set(last)
    assert (tmp_path / "example" / "adapter_config.json").is_file()
    assert (tmp_path / "example" / "sfr_head" / "config.json").is_file()


def test_unsupported_settings_are_clear_errors(tmp_path, chats):
    for overrides, message in ((dict(packing=True), "packing"), (dict(target_source="ema"), "ema")):
        with pytest.raises(ValueError, match=message):
            SFRSFTTrainer(model=str(default_model_path()), train_dataset=chats,
                          args=_config(SFRSFTConfig, tmp_path, **overrides))
    with pytest.raises(ValueError, match="lambda_max"):
        _config(SFRSFTConfig, tmp_path, lambda_max=-1.0)
