"""``sfr eval``'s command line: what it refuses before any sampling."""
import json

import pytest

from sfr.cli import main


@pytest.mark.parametrize("command", ["dialogue", "code"])
def test_an_out_that_holds_results_is_refused_unless_overwrite(tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    earlier = json.dumps({"models": {"runs/sft": {}, "runs/sfr": {}}})  # an earlier two-model comparison
    (out / "results.json").write_text(earlier)
    (out / "report.md").write_text("# earlier report\n")
    assert main(["eval", command, "--model", "sfr-tiny", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"sfr eval {command}: error: --out {out} holds the results of an earlier run "
                                       "(results.json, report.md): pass --overwrite to replace them, or choose "
                                       "another --out\n")
    assert (out / "results.json").read_text() == earlier
    if command == "code":  # --overwrite replaces them (a one-token run on one embedded problem)
        assert main(["eval", "code", "--model", "sfr-tiny", "--out", str(out), "--overwrite", "--n", "1", "--k", "1",
                     "--limit", "1", "--max-new-tokens", "1"]) == 0
        assert json.loads((out / "results.json").read_text())["problems"][0]["task_id"] == "sfr/0"
