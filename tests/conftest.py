"""Shared test setup.

Without CUDA, Triton kernels run in the interpreter; ``TRITON_INTERPRET`` must be set before any
``@triton.jit`` function is defined, i.e. before ``sfr_kernels`` is imported, hence here at the top.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the imports below
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def shared_data() -> Path:
    """The public data sets beside the checkout (``../shared/data``); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield
