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
