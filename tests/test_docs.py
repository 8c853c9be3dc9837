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


def _cited_design_sections():
    """``(file, document, section)`` for every document under docs/ (with an optional quoted section name
    after it) that a Python file of the repository cites."""
    cited = []
    for path in sorted(ROOT.glob("**/*.py")):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        for doc, section in re.findall(r'(docs/[\w.-]+\.md)(?:, "([^"]+)")?', path.read_text(encoding="utf-8")):
            cited.append((path.relative_to(ROOT), doc, section))
    return cited


def test_every_cited_document_and_section_exists():
    cited = _cited_design_sections()
    assert any(str(path).startswith("sfr/") for path, _, _ in cited)  # the library's docstrings point there
    for path, doc, section in cited:
        assert (ROOT / doc).is_file(), f"{path} cites {doc}, which is not in the repository"
        if section:
            headings = re.findall(r"^#+ (.+)$", (ROOT / doc).read_text(encoding="utf-8"), flags=re.M)
            assert section in headings, f"{path} cites section {section!r} of {doc}; its sections are {headings}"
    # The spec outside the repository is not cited by the library (users never see it).
    for path in sorted([*(ROOT / "sfr").glob("**/*.py"), *(ROOT / "sfr_kernels").glob("*.py"), *(ROOT / "bench").glob("*.py")]):
        assert "DESIGN.md" not in path.read_text(encoding="utf-8"), path
