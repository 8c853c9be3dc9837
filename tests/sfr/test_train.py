"""sfr.train.train: the Python API of `sfr train`, and the checks it runs before the first step."""
import json

import pytest
import torch
from datasets import Dataset
from tiny_models import D, E, T, make_args, one_thread, tiny_backbone, tiny_dataset  # noqa: F401  (one_thread: an autouse fixture)
from transformers import AutoModelForCausalLM, TrainerCallback

from sfr.config import SFRConfig
from sfr.model import SFRModel


def _tiny_tokenizer():
    from transformers import AutoTokenizer

    from sfr.tiny_lm import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def test_train_api_with_a_model_object_and_a_prepared_dataset(tmp_path):
    from sfr.train import train

    tokenizer = _tiny_tokenizer()
    args = make_args(tmp_path / "api", max_steps=2, save_strategy="no")
    result = train(args, model=tiny_backbone(vocab_size=len(tokenizer)), data=tiny_dataset(), tokenizer=tokenizer)
    assert result.output_dir == str(tmp_path / "api")
    assert [h["step"] for h in result.log_history if "loss" in h] == [1, 2]
    assert result.metrics["final_sfr_lambda"] == 0.5 and "final_ce_loss" in result.metrics
    assert (tmp_path / "api" / "sfr_head" / "config.json").is_file()
    state = json.loads((tmp_path / "api" / "trainer_state.json").read_text())
    assert any("sfr_loss" in h for h in state["log_history"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "api").config.vocab_size == len(tokenizer)


def test_train_api_checks_its_inputs_before_training(tmp_path):
    from sfr.train import train

    tokenizer = _tiny_tokenizer()
    vocab = len(tokenizer)
    cases = [
        (dict(model=SFRModel.from_backbone(tiny_backbone(vocab_size=vocab), E + 4, sfr_config=SFRConfig(head_width=16))),
         f"E={E}.*E={E + 4}"),  # prepared data whose E differs from the head
        (dict(model=tiny_backbone()), "do not fit"),  # a tokenizer of another model
        (dict(model=SFRModel.from_backbone(tiny_backbone(vocab_size=vocab), E, objective="mtp")), "objective"),
        (dict(model=tiny_backbone(vocab_size=vocab), resume_from_checkpoint="latest"), "no checkpoint"),
    ]
    for kwargs, message in cases:
        checkpoint = kwargs.pop("resume_from_checkpoint", None)
        args = make_args(tmp_path / "bad", resume_from_checkpoint=checkpoint)
        with pytest.raises(ValueError, match=message):
            train(args, data=tiny_dataset(), tokenizer=tokenizer, **kwargs)
        assert not (tmp_path / "bad").exists()


def test_train_refuses_an_output_dir_that_holds_a_run_unless_resuming_or_overwriting(tmp_path, capsys):
    from sfr.train import train

    tokenizer = _tiny_tokenizer()
    run = tmp_path / "run"

    def again(**settings):
        args = make_args(run, save_strategy="steps", save_steps=1, save_total_limit=1, phase_a_steps=0, ramp_steps=0,
                         **settings)
        return train(args, model=tiny_backbone(vocab_size=len(tokenizer)), data=tiny_dataset(), tokenizer=tokenizer)

    again(max_steps=2)
    state = (run / "trainer_state.json").read_text()
    with pytest.raises(ValueError, match="holds a run .*checkpoint-2.*--resume-from-checkpoint latest.*"
                                         "--overwrite-output-dir.*another --output-dir"):
        again(max_steps=1)  # would overwrite the model and rotate checkpoint-2 away
    assert (run / "checkpoint-2").is_dir() and (run / "trainer_state.json").read_text() == state
    assert again(max_steps=3, resume_from_checkpoint="latest").global_step == 3
    result = again(max_steps=1, overwrite_output_dir=True)
    assert result.global_step == 1 and "--overwrite-output-dir: replacing the run" in capsys.readouterr().err


def test_train_rejects_token_ids_beyond_the_model_vocabulary_before_training(tmp_path):
    from sfr.train import train

    tokenizer = _tiny_tokenizer()
    vocab = len(tokenizer)
    rows = tiny_dataset().to_list()
    other_input = Dataset.from_list([{**r, "input_ids": r["input_ids"][:-1] + [vocab + 3]} for r in rows])
    other_labels = Dataset.from_list([{**r, "labels": r["labels"][:-1] + [vocab + 5]} for r in rows])
    for data, message in ((other_input, f"input_ids reach token id {vocab + 3} but the model has {vocab} input"),
                          (other_labels, f"labels reach token id {vocab + 5} but the model has {vocab} output")):
        with pytest.raises(ValueError, match=f"{message}.*prepare it again with --model"):
            train(make_args(tmp_path / "run"), model=tiny_backbone(vocab_size=vocab), data=data, tokenizer=tokenizer)
        assert not (tmp_path / "run").exists()


def test_examples_longer_than_the_model_context_are_truncated_to_it(tmp_path):
    from transformers import GPT2Config

    from sfr.train import train

    tokenizer = _tiny_tokenizer()
    # Learned position embeddings: a row longer than n_positions would fail inside the model.
    config = GPT2Config(n_positions=T - 4, n_embd=D, n_layer=1, n_head=2, vocab_size=len(tokenizer))
    with pytest.warns(UserWarning, match=f"the model's context \\(max_position_embeddings={T - 4}\\): 8 of 8 "
                                         f"examples are longer than {T - 4} tokens and are truncated"):
        result = train(make_args(tmp_path / "run", max_steps=2, phase_a_steps=0, ramp_steps=0),
                       model=AutoModelForCausalLM.from_config(config),
                       data=tiny_dataset(), tokenizer=tokenizer)
    assert result.global_step == 2


def test_a_failed_run_removes_the_output_dir_it_created_and_left_empty(tmp_path):
    from sfr.train import train

    class Fail(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise RuntimeError("stop")

    tokenizer = _tiny_tokenizer()
    for out, kept in ((tmp_path / "new" / "run", tmp_path), (tmp_path, tmp_path)):
        with pytest.raises(RuntimeError, match="stop"):
            train(make_args(out), model=tiny_backbone(vocab_size=len(tokenizer)), data=tiny_dataset(),
                  tokenizer=tokenizer, callbacks=[Fail()])
        assert not (tmp_path / "new").exists() and kept.is_dir()  # an existing directory stays


def test_train_checks_the_output_dir_and_the_triton_backend_before_loading_anything(tmp_path, monkeypatch):
    from sfr.train import train

    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is an existing file"):
        train(make_args(tmp_path / "file"), model="no/such-model")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="--loss-backend triton: the Triton kernels need CUDA .*TRITON_INTERPRET=1"):
        train(make_args(tmp_path / "run", loss_backend="triton"), model="no/such-model")
    assert not (tmp_path / "run").exists()


def test_resuming_a_head_of_another_dimension_fails_before_training(tmp_path):
    from sfr.train import train

    tokenizer = _tiny_tokenizer()
    first = make_args(tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1)
    train(first, model=tiny_backbone(vocab_size=len(tokenizer)), data=tiny_dataset(), tokenizer=tokenizer)
    wider = Dataset.from_list([{**row, "anchor_targets": [t + [0.0] for t in row["anchor_targets"]]}
                               for row in tiny_dataset()])
    again = make_args(tmp_path / "run", max_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match=f"checkpoint-1 holds a head with E={E}"):
        train(again, model=tiny_backbone(vocab_size=len(tokenizer)), data=wider, tokenizer=tokenizer)
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["global_step"] == 1  # not trained on


def test_a_run_resumed_with_a_longer_max_steps_ends_like_a_run_of_that_length(tmp_path):
    # issue 15 item 9: the head's init was not seeded (torch's start-up seed differs per process), so two
    # runs with the same --seed differed; with a constant LR nothing else depends on --max-steps
    from safetensors.torch import load_file

    from sfr.train import train

    tokenizer = _tiny_tokenizer()

    def run(folder, steps, start_seed, **settings):
        args = make_args(tmp_path / folder, max_steps=steps, save_strategy="steps", save_steps=2,
                         lr_scheduler_type="constant", **settings)
        backbone = tiny_backbone(vocab_size=len(tokenizer))
        torch.manual_seed(start_seed)  # stands for the global RNG state a fresh `sfr train` process starts with
        train(args, model=backbone, data=tiny_dataset(), tokenizer=tokenizer)

    run("full", 4, start_seed=101)
    run("part", 2, start_seed=202)
    run("part", 4, start_seed=303, resume_from_checkpoint="latest")
    for file in ("model.safetensors", "sfr_head/model.safetensors"):
        full, resumed = load_file(str(tmp_path / "full" / file)), load_file(str(tmp_path / "part" / file))
        assert full.keys() == resumed.keys()
        for key in full:
            torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=f"{file}: {key}")
