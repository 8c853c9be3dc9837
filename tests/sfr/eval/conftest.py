"""Fixtures of the evaluation tests."""
import pytest

from sfr.eval.generation import load_model


@pytest.fixture(scope="module")
def tiny():
    """``(model, tokenizer)`` of the embedded tiny LM (``sfr-tiny``) loaded for sampling on the CPU; the test is
    skipped if it cannot be built."""
    try:
        return load_model("sfr-tiny", device="cpu")
    except Exception as exc:
        pytest.skip(f"tiny model not available: {exc}")
