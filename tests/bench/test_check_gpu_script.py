"""bench/check_gpu.py, the one-shot GPU verification script, at least parses and runs its logic on a CPU.

``--smoke-cpu`` runs its accuracy, determinism and offset checks with tiny float32 shapes under the
Triton interpreter: it proves the script's plumbing, not anything about a GPU.
"""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "check_gpu.py"


def test_help_explains_the_checks():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--out", "--sanitizer", "--skip-large", "--smoke-cpu", "--only", "--budget-minutes"):
        assert option in proc.stdout


def test_cpu_self_test_passes_and_writes_the_summary(tmp_path):
    out = tmp_path / "summary.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke-cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "| accuracy | float32" in text and "| determinism |" in text and "| large offsets |" in text
    assert "| torch.compile | inductor, fullgraph |" in text
    assert "FAIL" not in text and "PASS" in text


def test_only_and_budget_select_the_checks(tmp_path):
    out = tmp_path / "summary.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke-cpu", "--only", "determinism", "large-offsets",
                           "--budget-minutes", "0", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # nothing ran: the budget is spent
    text = out.read_text()
    assert "| determinism | not run |" in text and "| large-offsets | not run |" in text and "accuracy" not in text
