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
