"""`sfr train`: flags in both forms, YAML config, tiny defaults, clear errors, and an end-to-end run."""
import json

import pytest
import torch
from tiny_models import one_thread  # noqa: F401  (an autouse fixture)

from sfr.cli import build_parser, main
from sfr.commands.train import build_arguments, read_config
from sfr.training_args import TINY_DEFAULTS


def parse(argv):
    return build_parser("train").parse_args(["train", *argv])


def test_dash_and_underscore_flags_are_the_same_argument():
    a = parse(["--output-dir", "x", "--max-steps", "7", "--lr-scheduler-type", "constant", "--phase-a-steps", "2",
               "--logging-steps", "3", "--seed", "5"])
    b = parse(["--output_dir", "x", "--max_steps", "7", "--lr_scheduler_type", "constant", "--phase_a_steps", "2",
               "--logging_steps", "3", "--seed", "5"])
    assert vars(a) == vars(b)
    assert (a.max_steps, a.phase_a_steps, a.lr_scheduler_type, a.seed) == (7, 2, "constant", 5)
    assert not hasattr(a, "learning_rate")  # unset flags stay unset: YAML and tiny defaults fill them


def test_tiny_defaults_apply_only_to_unset_settings_of_the_default_model(tmp_path):
    args = build_arguments({"output_dir": str(tmp_path), "max_steps": 3})
    assert args.max_steps == 3 and args.learning_rate == TINY_DEFAULTS["learning_rate"]
    real = build_arguments({"output_dir": str(tmp_path), "model": "some/model"})
    assert real.learning_rate == 5e-5 and real.max_steps == -1  # transformers' own defaults
    assert build_arguments({}).output_dir == "sfr-output"  # `sfr train` with no arguments at all


def test_yaml_config_keys_are_argument_names_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning-rate: 1e-3\nobjective: mtp\nmax_steps: 9\nlambda_max: 0.25\n")
    values = read_config(str(config))
    assert values == {"learning_rate": 1e-3, "objective": "mtp", "max_steps": 9, "lambda_max": 0.25}
    args = build_arguments({**values, "output_dir": str(tmp_path), "max_steps": 4})
    assert (args.objective, args.max_steps, args.learning_rate, args.lambda_max) == ("mtp", 4, 1e-3, 0.25)


def test_target_scale_flag_reaches_the_sfr_config(tmp_path):
    assert parse(["--target-scale", "sqrt_e"]).target_scale == "sqrt_e"
    args = build_arguments({"output_dir": str(tmp_path), "target_scale": "sqrt_e"})
    assert args.sfr_config(128, 384).target_multiplier(384) == pytest.approx(384 ** 0.5)
    assert build_arguments({"output_dir": str(tmp_path)}).sfr_config(128, 384).target_scale == 1.0


def test_unknown_config_key_is_an_error_naming_it(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("max_steps: 3\nlamda_max: 2\n")
    with pytest.raises(ValueError, match="lamda_max"):
        read_config(str(config))
    assert main(["train", "--output-dir", str(tmp_path / "o"), "--config", str(config)]) == 2
    assert "lamda_max" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--output-dir", "{tmp}", "--config", "{tmp}/missing.yaml"], "file not found"),
    (["--output-dir", "{tmp}", "--resume-from-checkpoint", "latest"], "no checkpoint"),
    (["--output-dir", "{tmp}", "--resume-from-checkpoint", "{tmp}/nowhere"], "not a directory"),
    (["--output-dir", "{tmp}", "--time-sampling", "zero", "--source-std", "-1"], "source_std"),
    (["--output-dir", "{tmp}", "--target-scale", "sqrt"], "target_scale"),
])
def test_bad_input_fails_before_training(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["train", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "model.safetensors").exists()


def test_malformed_yaml_config_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("max-steps: [\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML: .* \(line 2, column 1\)"):
        read_config(str(config))
    assert main(["train", "--output-dir", str(tmp_path / "o"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sfr train: error: --config") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--output-dir", "{tmp}/file"], "is an existing file, not a directory"),
    (["--output-dir", "{tmp}/new/run", "--max-steps", "0"], "max_steps must be a positive"),
    (["--output-dir", "{tmp}/new/run", "--max-steps", "-5"], "max_steps must be a positive"),
    (["--output-dir", "{tmp}/new/run", "--learning-rate", "-1"], "learning_rate must be >= 0"),
    (["--output-dir", "{tmp}/new/run", "--per-device-train-batch-size", "0"], "per_device_train_batch_size"),
    (["--output-dir", "{tmp}/new/run", "--loss-backend", "triton"], "the Triton kernels need CUDA"),
    (["--output-dir", "{tmp}/new/run", "--model", "{tmp}/no-model"], "--model {tmp}/no-model: directory "
     "{tmp}/no-model does not exist"),
])
def test_bad_input_is_an_error_line_and_leaves_no_output_dir(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (tmp_path / "file").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "sfr train: error: " in err and message.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_summary_reports_the_step_count_and_a_trend_only_between_two_logged_steps():
    from sfr.commands.train import _summary
    from sfr.train import TrainResult

    def summary(logged, **metrics):
        return _summary(TrainResult("out", logged, metrics, global_step=15), 1.0)

    one = summary([{"step": 10, "loss": 7.801, "ce_loss": 6.8}])
    assert one.startswith("sfr train: 15 steps") and "loss 7.801, ce_loss 6.8" in one and "->" not in one
    two = summary([{"step": 5, "loss": 8.0}, {"step": 10, "loss": 7.5}, {"train_loss": 7.9, "step": 15}])
    assert "15 steps" in two and "loss 8 -> 7.5" in two
    none = summary([{"train_loss": 7.9, "step": 15}], train_loss=7.9)
    assert "15 steps" in none and "mean loss over the run: 7.9" in none
    resumed = _summary(TrainResult("out", [{"step": 40, "loss": 7.5}], {}, global_step=40, start_step=30), 1.0)
    assert resumed.startswith("sfr train: 10 steps (resumed at step 30, now at 40) in 1.0 s")  # not "40 steps"


def test_help_shows_the_defaults_of_the_embedded_run_and_one_duration():
    text = build_parser("train").command_parsers["train"].format_help()
    assert f"without --model: {TINY_DEFAULTS['max_steps']}" in text  # not only transformers' -1
    assert "20 s" in text and "few minutes" not in text and "< 1 min" not in text


def test_unknown_objective_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output-dir", str(tmp_path), "--objective", "dpo"])
    assert exit_info.value.code == 2
    assert "objective" in capsys.readouterr().err


def test_sfr_train_end_to_end_on_the_embedded_default_and_resume_latest(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    assert main(["train", "--output-dir", str(out), "--max-steps", "3", "--save-steps", "3", "--logging-steps", "1",
                 "--disable-tqdm", "true"]) == 0
    assert torch.get_num_threads() == threads  # the embedded run's single thread is restored afterwards
    captured = capsys.readouterr()
    assert "sfr train: 3 steps" in captured.out and "sfr_loss" in captured.out and "attention=sdpa" in captured.err
    assert "1 intra-op thread" in captured.err and "ce=lm_head + CE" in captured.err
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert len(logs) == 3 and all({"ce_loss", "sfr_loss", "sfr_lambda"} <= h.keys() for h in logs)
    # the tiny default's phases scaled to 3 steps: phase A = round(0.2 * 3) = 1 step, ramp = round(0.3 * 3) = 1
    assert [h["sfr_lambda"] for h in logs] == [0.0, 1.0, 1.0]
    assert (out / "sfr_head" / "model.safetensors").is_file() and (out / "checkpoint-3").is_dir()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]

    # a checkpoint that already reached --max-steps: nothing to train, refused before any work
    assert main(["train", "--output-dir", str(out), "--max-steps", "3", "--resume-from-checkpoint", "latest"]) == 2
    assert "is at step 3 >= --max-steps 3: nothing left to train" in capsys.readouterr().err
    assert not (out / "checkpoint-4").exists()

    # --resume-from-checkpoint latest continues from checkpoint-3 to step 4
    assert main(["train", "--output-dir", str(out), "--max-steps", "4", "--logging-steps", "1",
                 "--disable-tqdm", "true", "--resume-from-checkpoint", "latest"]) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.err
    assert "sfr train: 1 step (resumed at step 3, now at 4) in " in captured.out
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert torch.isfinite(torch.tensor([h["loss"] for h in state["log_history"] if "loss" in h])).all()


def test_sfr_train_with_a_model_path_and_raw_data_prepares_and_caches_it(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from sfr.tiny_lm import default_model_path

    monkeypatch.setenv("SFR_CACHE", str(tmp_path / "cache"))  # the prepared data goes here
    model_path = default_model_path()  # a local transformers checkpoint, passed like any other path
    replies = ["Arr, I sail the seas and I love the salty wind in my sails every day.",
               "BEEP. I compute numbers all day long and I enjoy a tidy list of tasks."]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [
        {"role": "system", "content": f"persona {i % 2}"}, {"role": "user", "content": "What do you do all day?"},
        {"role": "assistant", "content": replies[i % 2]}]}) for i in range(6)) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--output-dir", str(out), "--model", str(model_path), "--data", str(data), "--max-steps", "2",
            "--per-device-train-batch-size", "3", "--learning-rate", "1e-3", "--save-strategy", "no",
            "--disable-tqdm", "true", "--logging-steps", "1", "--segment-tokens", "8", "--anchor-stride", "4",
            "--dataloader-pin-memory", "false"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "examples=6" in err and "E=384" in err
    prepared = list((tmp_path / "cache" / "targets").glob("*/sfr_targets.json"))
    assert len(prepared) == 1  # prepared once and cached
    assert f"[sfr train] prepared targets cached at {prepared[0].parent} ({data}; --data {prepared[0].parent} " \
           "uses them directly)" in err  # says where
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logs) == 2 and all(h["sfr_loss"] > 0 for h in logs)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == \
        AutoModelForCausalLM.from_pretrained(model_path).config.vocab_size
    # The prepared directory itself is accepted as --data
    assert main([*argv[:6], str(prepared[0].parent), *argv[7:], "--output-dir", str(tmp_path / "again")]) == 0


def test_tiny_defaults_scale_warmup_and_phases_with_max_steps_unless_set(tmp_path):
    from sfr.training_args import tiny_defaults

    assert tiny_defaults() == TINY_DEFAULTS and tiny_defaults(-1) == TINY_DEFAULTS
    assert tiny_defaults(TINY_DEFAULTS["max_steps"]) == TINY_DEFAULTS
    short = build_arguments({"output_dir": str(tmp_path), "max_steps": 20})
    assert (short.warmup_steps, short.phase_a_steps, short.ramp_steps) == (1, 4, 6)
    assert short.lambda_at(19) == short.lambda_max  # a short run still reaches lambda_max
    long = build_arguments({"output_dir": str(tmp_path), "max_steps": 1000, "phase_a_steps": 7})
    assert (long.warmup_steps, long.phase_a_steps, long.ramp_steps) == (50, 7, 300)  # explicit values win
