"""The README's Python examples and examples/ scripts run as written."""
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize("script", ["quickstart.py"])
def test_example_scripts(script, capsys):
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"sfr_loss ([0-9.]+)", out)]
    assert losses[-1] < 0.5 * losses[0]  # the head learns
