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


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(capsys, monkeypatch):
    import sfr.targets

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sfr.targets, "main", interrupted)
    assert main(["prepare"]) == 130
    assert capsys.readouterr().err.strip() == "sfr prepare: interrupted"
