"""Every command's --model / --reference-model / --encoder that cannot load: one error line, exit 2, in
seconds, before any other work (issue 15, item 1; the check itself: tests/sfr/test_checks.py)."""
import time

import pytest

from sfr.cli import main

MISSING_DIR = "directory {tmp}/{name} does not exist"


@pytest.mark.parametrize("argv, argument", [
    (["train", "--output-dir", "{tmp}/out", "--model", "./{name}"], "--model"),
    (["train", "--output-dir", "{tmp}/out", "--encoder", "./{name}"], "--encoder"),
    (["prepare", "--out", "{tmp}/out", "--model", "./{name}"], "--model"),
    (["prepare", "--out", "{tmp}/out", "--encoder", "./{name}"], "--encoder"),
    (["eval", "dialogue", "--out", "{tmp}/out", "--model", "sfr-tiny", "--model", "./{name}"], "--model"),
    (["eval", "dialogue", "--out", "{tmp}/out", "--model", "sfr-tiny", "--reference-model", "./{name}"],
     "--reference-model"),
    (["eval", "dialogue", "--out", "{tmp}/out", "--model", "sfr-tiny", "--encoder", "./{name}"], "--encoder"),
    (["eval", "code", "--out", "{tmp}/out", "--model", "./{name}"], "--model"),
])
def test_a_missing_directory_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, argv, argument):
    import sfr.data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sfr.data, "load_records", lambda *a, **k: pytest.fail("data loaded before the check"))
    argv = [a.format(tmp=tmp_path, name="runs/nonexist") for a in argv]
    started = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - started < 20  # the check asks nothing of the network; loading is not reached
    err = capsys.readouterr().err
    command = " ".join(argv[:2] if argv[0] == "eval" else argv[:1])
    expected = f"sfr {command}: error: {argument} ./runs/nonexist: " + MISSING_DIR.format(tmp=tmp_path,
                                                                                          name="runs/nonexist")
    assert err == expected + "\n"
    assert not (tmp_path / "out").exists()


def test_a_hub_style_model_offline_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the tests run with HF_HUB_OFFLINE=1
    assert main(["eval", "dialogue", "--model", "runs/nonexistent", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sfr eval dialogue: error: --model runs/nonexistent: directory {tmp_path}/runs/nonexistent "
                          "does not exist, and no hub model runs/nonexistent is in the Hugging Face cache "
                          "(HF_HUB_OFFLINE is set") and err.count("\n") == 1
