"""`sfr train`: flags in both forms, YAML config, tiny defaults, clear errors, and an end-to-end run."""
import json

import pytest
import torch

from sfr.cli import build_parser, main
from sfr.train_cli import build_arguments, read_config
from sfr.trainer import TINY_DEFAULTS


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


def test_yaml_config_keys_are_argument_names_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning-rate: 1e-3\nobjective: mtp\nmax_steps: 9\nlambda_max: 0.25\n")
    values = read_config(str(config))
    assert values == {"learning_rate": 1e-3, "objective": "mtp", "max_steps": 9, "lambda_max": 0.25}
    args = build_arguments({**values, "output_dir": str(tmp_path), "max_steps": 4})
    assert (args.objective, args.max_steps, args.learning_rate, args.lambda_max) == ("mtp", 4, 1e-3, 0.25)


def test_unknown_config_key_is_an_error_naming_it(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("max_steps: 3\nlamda_max: 2\n")
    with pytest.raises(ValueError, match="lamda_max"):
        read_config(str(config))
    assert main(["train", "--output-dir", str(tmp_path / "o"), "--config", str(config)]) == 2
    assert "lamda_max" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "1"], "--output-dir is required"),
    (["--output-dir", "{tmp}", "--resume-from-checkpoint", "latest"], "no checkpoint"),
    (["--output-dir", "{tmp}", "--resume-from-checkpoint", "{tmp}/nowhere"], "not a directory"),
    (["--output-dir", "{tmp}", "--time-sampling", "zero", "--source-std", "-1"], "source_std"),
])
def test_bad_input_fails_before_training(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["train", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "model.safetensors").exists()


def test_unknown_objective_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output-dir", str(tmp_path), "--objective", "dpo"])
    assert exit_info.value.code == 2
    assert "objective" in capsys.readouterr().err


def test_sfr_train_end_to_end_on_the_embedded_default_and_resume_latest(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--max-steps", "3", "--save-steps", "3", "--logging-steps", "1",
                 "--disable-tqdm", "true"]) == 0
    captured = capsys.readouterr()
    assert "sfr train: 3 steps" in captured.out and "attention=sdpa" in captured.err
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert len(logs) == 3 and all({"ce_loss", "sfr_loss", "sfr_lambda"} <= h.keys() for h in logs)
    assert all(h["sfr_lambda"] == 0.0 for h in logs)  # still in phase A (tiny default: 40 steps)
    assert (out / "sfr_head" / "model.safetensors").is_file() and (out / "checkpoint-3").is_dir()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]

    # --resume-from-checkpoint latest continues from checkpoint-3 to step 4
    assert main(["train", "--output-dir", str(out), "--max-steps", "4", "--logging-steps", "1",
                 "--disable-tqdm", "true", "--resume-from-checkpoint", "latest"]) == 0
    assert "resuming from" in capsys.readouterr().err
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert torch.isfinite(torch.tensor([h["loss"] for h in state["log_history"] if "loss" in h])).all()
