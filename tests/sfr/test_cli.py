import importlib
import os
import subprocess
import sys

import sfr
from sfr.cli import COMMANDS, main


def test_version_and_help(capsys):
    result = subprocess.run([sys.executable, "-m", "sfr", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"sfr {sfr.__version__}"
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_commands_live_in_sfr_commands_and_load_only_when_run():
    code = ("import sys; from sfr.cli import main; main([]); "
            "print(sorted(m for m in sys.modules if m.startswith('sfr.commands.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"  # `sfr --help` imports no command
    for name, (module_name, _) in COMMANDS.items():
        assert module_name == f"sfr.commands.{name}"
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.main)


def test_unknown_command_is_an_error():
    result = subprocess.run([sys.executable, "-m", "sfr", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_an_unknown_flag_shows_the_commands_own_usage(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--bogus-flag", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "usage: sfr prepare" in err and "unrecognized arguments: --bogus-flag 3" in err
    with pytest.raises(SystemExit):  # a subcommand of a command: its own usage too
        main(["eval", "dialogue", "--model", "m", "--bogus"])
    assert "usage: sfr eval dialogue" in capsys.readouterr().err


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(capsys, monkeypatch):
    import sfr.commands.prepare

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sfr.commands.prepare, "main", interrupted)
    assert main(["prepare"]) == 130
    assert capsys.readouterr().err.strip() == "sfr prepare: interrupted"


def test_every_warning_is_one_line_of_its_own_in_one_format(capsys, monkeypatch):
    import os
    import re
    import sys
    import warnings

    from tqdm import tqdm

    import sfr
    import sfr.commands.prepare

    def warns(args):
        bar = tqdm(total=4, desc="encode", file=sys.stderr)
        bar.update(1)  # a progress bar part-way: its line has no newline yet
        warnings.warn("sfr prepare: the cache is stale", UserWarning, stacklevel=1)  # already prefixed: not twice
        sandbox = os.path.join(os.path.dirname(sfr.__file__), "eval", "sandbox.py")
        warnings.warn_explicit("sandbox: no bubblewrap;\n  rlimits only", RuntimeWarning, sandbox, 250)  # sfr's own
        warnings.warn_explicit("this option goes away", FutureWarning, "/elsewhere/library/module.py", 7)
        bar.close()
        return 0

    monkeypatch.setattr(sfr.commands.prepare, "main", warns)
    assert main(["prepare"]) == 0
    err = capsys.readouterr().err
    lines = re.split(r"[\r\n]", err)  # a line of its own: not glued to the bar's text
    assert "sfr prepare: warning: the cache is stale" in lines
    assert "sfr prepare: warning: sandbox: no bubblewrap; rlimits only" in lines
    assert "sfr prepare: warning: this option goes away [FutureWarning]" in lines
    assert "sandbox.py" not in err and "module.py" not in err and "sfr prepare: sfr prepare" not in err


def test_quiet_drops_deepspeeds_no_accelerator_notice_and_nothing_else(tmp_path):
    """With DeepSpeed installed, importing the Trainer stack on a CPU logs "Setting accelerator to CPU";
    ``--quiet`` filters that one line (installed before DeepSpeed creates its logger) and no other."""
    import logging

    import pytest

    from sfr.cli import _drop_deepspeed_cpu_notice

    def record(message):
        return logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, message, None, None)

    assert not _drop_deepspeed_cpu_notice(record("Setting accelerator to CPU. If you have GPU or other ..."))
    assert _drop_deepspeed_cpu_notice(record("ZeRO-3: partitioning 12 parameters"))
    pytest.importorskip("deepspeed")
    script = ("import logging, sys\n"
              "from sfr.cli import main\n"
              "main(['study', '--quiet', '--seeds', '0', '--output-dir', sys.argv[1]])\n"  # exits 2 before work
              "from deepspeed.accelerator import get_accelerator\n"
              "print('accelerator', get_accelerator()._name)\n"
              "logging.getLogger('DeepSpeed').warning('another DeepSpeed warning')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    out = done.stdout + done.stderr
    assert "accelerator cpu" in out and "another DeepSpeed warning" in out, out
    assert "Setting accelerator to CPU" not in out, out
