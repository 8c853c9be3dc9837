"""Up-front input checks: output directories, devices and integer arguments."""
import os
from pathlib import Path

import pytest
import torch

from sfr.checks import check_device, check_int, check_output_dir


def test_output_dir_accepts_new_and_existing_directories_and_creates_nothing(tmp_path):
    assert check_output_dir(tmp_path) == tmp_path
    nested = tmp_path / "a" / "b"
    assert check_output_dir(str(nested)) == nested and not (tmp_path / "a").exists()


def test_output_dir_rejects_a_file_or_a_path_under_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(ValueError, match="--out .*afile is an existing file"):
        check_output_dir(afile, "--out")
    with pytest.raises(ValueError, match="afile is a file, so no directory"):
        check_output_dir(afile / "sub" / "dir")
    with pytest.raises(ValueError, match="must be a directory path"):
        check_output_dir("")
    assert afile.read_text() == "keep me"


def test_output_dir_rejects_an_unwritable_parent(tmp_path, monkeypatch):
    # The tests run as root, who may write anywhere: os.access stands in for a read-only parent.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ValueError, match="not writable"):
        check_output_dir(tmp_path / "run")


def test_device_check():
    check_device(None)
    check_device("cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            check_device("cuda")
    else:  # pragma: no cover - GPU machines
        with pytest.raises(ValueError, match="device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_check_int_returns_the_value_and_names_the_argument_otherwise():
    assert check_int("n", 3) == 3 and check_int("n", 0, 0) == 0
    assert check_int("limit", None, optional=True) is None
    for bad in (0, -2, True, 1.0, "3", None):
        with pytest.raises(ValueError, match=r"^n must be an int >= 1, got "):
            check_int("n", bad)
    with pytest.raises(ValueError, match=r"^limit must be an int >= 2 or None, got 1$"):
        check_int("limit", 1, 2, optional=True)
    with pytest.raises(ValueError, match=r"^samples must be an int >= 2 \(why\), got 1$"):
        check_int("samples", 1, 2, why=" (why)")


# ---- a model or encoder that cannot load: one line in seconds (issue 15, item 1) -------------------------
def test_a_path_that_is_no_directory_says_so_without_asking_the_hub(tmp_path, hub, monkeypatch):
    from sfr.checks import check_local_or_hub, why_not_loadable

    hub.online()
    monkeypatch.chdir(tmp_path)
    assert why_not_loadable(tmp_path) is None  # an existing directory
    assert why_not_loadable("./runs/nonexist") == f"directory {tmp_path / 'runs' / 'nonexist'} does not exist"
    assert why_not_loadable("../a/b") == f"directory {tmp_path.parent / 'a' / 'b'} does not exist"
    (tmp_path / "weights.bin").write_text("")
    assert why_not_loadable("weights.bin", "sentence encoder") == \
        f"{tmp_path / 'weights.bin'} is a file, not a sentence encoder directory"
    with pytest.raises(ValueError, match=r"^--reference-model ./runs/nonexist: directory .* does not exist$"):
        check_local_or_hub("./runs/nonexist", "--reference-model")
    assert hub.requests == []  # not a hub id: nothing to ask


def test_a_hub_style_name_says_the_hub_could_not_be_reached_in_seconds(tmp_path, hub, monkeypatch):
    import time

    from sfr.checks import why_not_loadable

    monkeypatch.chdir(tmp_path)
    offline = why_not_loadable("runs/nonexist")  # the tests run with HF_HUB_OFFLINE=1
    assert offline.startswith(f"directory {tmp_path / 'runs' / 'nonexist'} does not exist, and no hub model "
                              "runs/nonexist is in the Hugging Face cache (HF_HUB_OFFLINE is set")
    hub.unreachable()
    started = time.perf_counter()
    unreachable = why_not_loadable("Qwen/Qwen2.5-0.5B")
    assert time.perf_counter() - started < 10  # from_pretrained retries for ~55 s
    assert "does not exist, and the Hugging Face hub could not be reached to look it up (" in unreachable
    hub.online()
    assert why_not_loadable("org/there") is None and hub.requests == ["/api/models/org/there"]
    assert why_not_loadable("org/gone").endswith("and the Hugging Face hub has no model org/gone (a private one "
                                                 "needs `hf auth login`)")


def test_a_hub_model_in_the_local_cache_passes_offline(hub):
    from sfr.checks import why_not_loadable

    hub.cache("org/cached")
    assert why_not_loadable("org/cached") is None
    assert "HF_HUB_OFFLINE" in why_not_loadable("org/other")
    assert hub.requests == []
