"""SFRTrainer: GA-exact scaling, exact resume, plain-transformers saving, logs, the EMA teacher."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import D, E, StopAt, T, V, make_args, one_thread, tiny_backbone, tiny_dataset  # noqa: F401  (one_thread: an autouse fixture)
from transformers import AutoModelForCausalLM

from sfr.config import SFRConfig
from sfr.head import load_flow_head
from sfr.model import SFRModel
from sfr.schedule import step_seed
from sfr.trainer import EMAUpdateCallback, SFRTrainer
from sfr.training_args import SFRTrainingArguments


def collate(features):
    """A minimal stand-in for SFRDataCollator on equal-length rows."""
    batch = {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "labels")}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    index, ends, targets = [], [], []
    for b, f in enumerate(features):
        index += [b * T + p for p in f["anchor_positions"]]
        ends += [b * T + e for e in f["anchor_segment_ends"]]
        targets += f["anchor_targets"]
    batch["anchor_index"] = torch.tensor(index, dtype=torch.long)
    batch["anchor_segment_end"] = torch.tensor(ends, dtype=torch.long)
    batch["anchor_targets"] = torch.tensor(targets, dtype=torch.float32)
    return batch



def make_trainer(args, seed=0, callbacks=None, tie=False):
    model = SFRModel.from_backbone(tiny_backbone(seed, tie=tie), E, objective=args.objective,
                                   sfr_config=args.sfr_config(D), target_source=args.target_source,
                                   ema_decay=args.ema_decay)
    callbacks = list(callbacks or []) + ([EMAUpdateCallback()] if model.teacher is not None else [])
    return SFRTrainer(model=model, args=args, train_dataset=tiny_dataset(), data_collator=collate, callbacks=callbacks)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    # mtp is deterministic (no draws), so the two runs see identical losses; plain SGD shows gradients directly.
    common = dict(objective="mtp", max_steps=2, optim="sgd", learning_rate=0.5, phase_a_steps=0, ramp_steps=0,
                  lr_scheduler_type="constant", max_grad_norm=0.0)
    big = make_trainer(make_args(tmp_path / "big", per_device_train_batch_size=4, **common))
    big.train()
    small = make_trainer(make_args(tmp_path / "ga", per_device_train_batch_size=1, gradient_accumulation_steps=4,
                                   **common))
    small.train()
    before = weights(make_trainer(make_args(tmp_path / "init", **common)).model)
    after_big, after_small = weights(big.model), weights(small.model)
    assert any((after_big[k] - before[k]).abs().max() > 1e-4 for k in before)
    for key in after_big:
        torch.testing.assert_close(after_small[key], after_big[key], rtol=1e-5, atol=1e-6, msg=key)
    big_log = [h for h in big.state.log_history if "loss" in h]
    small_log = [h for h in small.state.log_history if "loss" in h]
    for a, b in zip(big_log, small_log):
        assert a["ce_loss"] == pytest.approx(b["ce_loss"], rel=1e-5)
        assert a["sfr_loss"] == pytest.approx(b["sfr_loss"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("target_source", ["precomputed", "ema"])
def test_resume_continues_exactly(tmp_path, target_source):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, target_source=target_source, ema_decay=0.5)
    full = make_trainer(make_args(tmp_path / "full", **common))
    full.train()

    interrupted = make_trainer(make_args(tmp_path / "resumed", **common), callbacks=[StopAt(3)])
    interrupted.train()
    assert interrupted.state.global_step == 3
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert (checkpoint / "sfr_head" / "model.safetensors").is_file()
    assert (checkpoint / "sfr_teacher").is_dir() == (target_source == "ema")
    resumed = make_trainer(make_args(tmp_path / "resumed", **common), seed=99)  # other init: all state must load
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    final_full, final_resumed = weights(full.model), weights(resumed.model)
    assert final_full.keys() == final_resumed.keys()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=1e-6, msg=key)
    lam_full = [h["sfr_lambda"] for h in full.state.log_history if "loss" in h]
    lam_resumed = [h["sfr_lambda"] for h in resumed.state.log_history if "loss" in h]
    assert lam_full == lam_resumed == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("tie", [False, True])
def test_logs_and_saved_model_are_plain_transformers(tmp_path, tie):
    trainer = make_trainer(make_args(tmp_path / "run", target_source="ema"), tie=tie)
    head_before = weights(trainer.model.head)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all({"ce_loss", "sfr_loss", "sfr_lambda"} <= h.keys() for h in logs)
    for h in logs:
        assert h["loss"] == pytest.approx(h["ce_loss"] + h["sfr_loss"], rel=1e-4)
    assert any(not torch.equal(head_before[k], v) for k, v in weights(trainer.model.head).items())

    out = tmp_path / "out"
    reference = tiny_backbone(tie=tie)  # the from_config model
    reference.save_pretrained(tmp_path / "reference")
    with safe_open(str(out / "model.safetensors"), "pt") as saved, \
            safe_open(str(tmp_path / "reference" / "model.safetensors"), "pt") as saved_reference:
        keys = set(saved.keys())
        assert keys == set(saved_reference.keys())
    tied = {"lm_head.weight"} if tie else set()
    assert keys == set(reference.state_dict()) - tied  # no head, teacher or wrapper keys
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = trainer.model.backbone.eval()
    prompt = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, trained(prompt).logits)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
                           trained.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))
    head, config = load_flow_head(out / "sfr_head")
    for k, v in head.state_dict().items():
        assert torch.equal(v, trainer.model.head.state_dict()[k])
    assert config["objective"] == "sfr" and config["head_width"] == 32 and config["target_source"] == "ema"
    assert json.loads((out / "sfr_head" / "config.json").read_text())["head"]["embed_dim"] == E
    assert not (out / "sfr_teacher").exists()  # training state: checkpoints only


def test_ema_teacher_moves_once_per_optimizer_step_and_gets_no_gradient(tmp_path):
    # Two micro-batches per optimizer step: exactly one update, after the step, from the updated student.
    args = make_args(tmp_path, target_source="ema", ema_decay=0.75, max_steps=1, per_device_train_batch_size=1,
                     gradient_accumulation_steps=2)
    trainer = make_trainer(args)
    model = trainer.model
    before = weights(model.teacher.decoder)
    assert all(torch.equal(before[k], v) for k, v in model.decoder.state_dict().items())
    trainer.train()
    student, after = model.decoder.state_dict(), weights(model.teacher.decoder)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    for key in before:
        torch.testing.assert_close(after[key], 0.75 * before[key] + 0.25 * student[key], rtol=1e-6, atol=1e-7, msg=key)
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in model.teacher.parameters())


def test_each_micro_batch_gets_its_step_seed_lambda_and_the_accumulated_counts(tmp_path):
    args = make_args(tmp_path, max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                     phase_a_steps=1, ramp_steps=2, lambda_max=0.8)
    trainer = make_trainer(args)
    calls, forward = [], trainer.model.forward

    def spy(**kwargs):
        calls.append(kwargs)
        return forward(**kwargs)

    trainer.model.forward = spy
    trainer.train()
    assert len(calls) == 4  # 2 optimizer steps x 2 micro-batches
    for i, call in enumerate(calls):
        step, micro = divmod(i, 2)
        seed = call["sfr_seed"]
        assert seed.dtype == torch.int64 and seed.dim() == 0 and seed.device == args.device  # made on the device
        assert int(seed) == step_seed(3, step, micro, 0)
        assert call["sfr_lambda"] == args.lambda_at(step) == [0.0, 0.4][step]
    for step in range(2):
        pair = calls[2 * step:2 * step + 2]
        tokens = sum(int(c["labels"][:, 1:].ne(-100).sum()) for c in pair)
        anchors = sum(c["anchor_index"].numel() for c in pair)
        assert {float(c["num_items_in_batch"]) for c in pair} == {tokens}
        assert {float(c["num_anchors_in_batch"]) for c in pair} == {anchors}


DDP_WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_ddp_equals_one_process_with_the_whole_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo): the all-device counts and the per-rank division by the world size
    give the gradients of one process with the whole batch, and the logged losses are reduced across ranks."""
    common = dict(objective="mtp", max_steps=2, optim="sgd", learning_rate=0.5, phase_a_steps=0, ramp_steps=0,
                  lr_scheduler_type="constant", max_grad_norm=0.0)
    single = make_trainer(make_args(tmp_path / "single", per_device_train_batch_size=4, **common))
    single.train()
    settings = json.dumps(dict(per_device_train_batch_size=2, **common))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(DDP_WORKER), str(tmp_path / "ddp"), settings]
    repo = str(Path(__file__).resolve().parents[2])  # this checkout's sfr, whatever is pip-installed
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = torch.load(tmp_path / "ddp" / "result.pt")
    assert result["world_size"] == 2 and result["sfr_file"] == str(Path(repo) / "sfr" / "trainer.py")
    expected = weights(single.model)
    assert result["weights"].keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(result["weights"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    single_logs = [h for h in single.state.log_history if "loss" in h]
    ddp_logs = [h for h in result["log_history"] if "loss" in h]
    assert len(ddp_logs) == len(single_logs) == 2
    for a, b in zip(single_logs, ddp_logs):
        for name in ("loss", "ce_loss", "sfr_loss"):
            assert b[name] == pytest.approx(a[name], rel=1e-4), name


def test_sft_trainer_has_no_head_and_no_sfr_logs(tmp_path):
    trainer = make_trainer(make_args(tmp_path, objective="sft", max_steps=2))
    trainer.train()
    assert trainer.model.head is None
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("ce_loss" in h and "sfr_loss" not in h and "sfr_lambda" not in h for h in logs)


def test_trainer_rejects_a_plain_model_and_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="SFRModel"):
        SFRTrainer(model=tiny_backbone(), args=make_args(tmp_path), train_dataset=tiny_dataset(), data_collator=collate)
    with pytest.raises(ValueError, match="objective"):
        make_args(tmp_path, objective="rlhf")
    with pytest.raises(ValueError, match="target_source"):
        make_args(tmp_path, target_source="frozen")
    with pytest.raises(ValueError, match="time_sampling"):
        make_args(tmp_path, time_sampling="beta")
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        make_trainer(make_args(tmp_path, label_smoothing_factor=0.1))  # would be silently ignored otherwise
    assert isinstance(make_args(tmp_path).sfr_config(D), SFRConfig)
    # Every parameter is used at every step, so DDP is not asked to search for unused ones (unless told to).
    assert make_args(tmp_path).ddp_find_unused_parameters is False
    assert make_args(tmp_path, ddp_find_unused_parameters=True).ddp_find_unused_parameters is True


@pytest.mark.parametrize("setting, message", [
    (dict(max_steps=0), "max_steps must be a positive .* or -1 .* got 0"),  # transformers would train 1 step
    (dict(max_steps=-5), "max_steps must be a positive .* got -5"),  # transformers would train by epochs
    (dict(learning_rate=-1.0), "learning_rate must be >= 0"),
    (dict(per_device_train_batch_size=0), "per_device_train_batch_size must be >= 1"),
])
def test_arguments_reject_step_counts_learning_rates_and_batch_sizes_that_make_no_run(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **setting)
    assert make_args(tmp_path, max_steps=-1).max_steps == -1  # -1: train for num_train_epochs


def test_phase_a_training_updates_the_backbone_exactly_like_sft(tmp_path):
    # Gradient clipping is active (max_grad_norm=0.5 < the gradient norms): the head must not change the
    # backbone's clipping factor, so phase A follows the SFT trajectory bit for bit.
    common = dict(max_steps=3, phase_a_steps=3, max_grad_norm=0.5, optim="adamw_torch")
    sfr_run = make_trainer(make_args(tmp_path / "sfr", objective="sfr", **common))
    sft_run = make_trainer(make_args(tmp_path / "sft", objective="sft", **common))
    before = weights(sft_run.model.backbone)
    sfr_run.train()
    sft_run.train()
    assert all(h["grad_norm"] > 0.5 for h in sft_run.state.log_history if "grad_norm" in h)
    after_sfr, after_sft = weights(sfr_run.model.backbone), weights(sft_run.model.backbone)
    assert any(not torch.equal(after_sft[k], before[k]) for k in before)
    for key in after_sft:
        assert torch.equal(after_sfr[key], after_sft[key]), key



def test_activation_checkpointing_of_the_backbone_changes_no_weight(tmp_path):
    import dataclasses

    names = {f.name for f in dataclasses.fields(SFRTrainingArguments)}
    flag = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"  # 5.2x / 5.1x
    plain = make_trainer(make_args(tmp_path / "plain", max_steps=2, target_source="ema"))
    checkpointed = make_trainer(make_args(tmp_path / "ckpt", max_steps=2, target_source="ema", **{flag: True}))
    plain.train()
    checkpointed.train()
    def is_on(backbone):
        new_name = hasattr(type(backbone), "is_activation_checkpointing")  # transformers >= 5.2x
        return backbone.is_activation_checkpointing if new_name else backbone.is_gradient_checkpointing

    assert is_on(checkpointed.model.backbone) and not is_on(plain.model.backbone)
    expected = weights(plain.model)
    for key, value in weights(checkpointed.model).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("steps, phases, message", [
    (3, dict(phase_a_steps=3, ramp_steps=2), "phase A .* covers all 3 optimizer steps"),
    (3, dict(phase_a_steps=1, ramp_steps=4), "ends at step 3 with lambda = 0.5"),
])
def test_a_run_that_ends_before_lambda_max_warns(tmp_path, steps, phases, message):
    import sfr.trainer

    trainer = make_trainer(make_args(tmp_path, objective="sfr", max_steps=steps, **phases))
    with pytest.warns(UserWarning, match=message) as record:
        trainer.train()
    # attributed to sfr's callback, not to transformers' callback handler that calls it
    assert [w.filename for w in record if "--phase-a-steps" in str(w.message)] == [sfr.trainer.__file__]
    assert not str(record[0].message).startswith("sfr train:")  # the command line adds its prefix once


def test_a_run_that_reaches_lambda_max_or_has_no_head_does_not_warn(tmp_path):
    import warnings

    for objective, phases in (("sfr", dict(phase_a_steps=1, ramp_steps=2)), ("sft", dict(phase_a_steps=9))):
        trainer = make_trainer(make_args(tmp_path / objective, objective=objective, max_steps=3, **phases))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        assert not [w for w in caught if "lambda" in str(w.message) or "phase A" in str(w.message)]
