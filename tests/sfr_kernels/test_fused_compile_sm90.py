"""Every fused kernel compiles to an sm_90a cubin (H100/H200) without a GPU, without register spills.

The interpreter runs kernels as NumPy and cannot catch what only the real compiler sees (type
rules of the compiled dialect, loop-carried types, register pressure of the chosen tiles), so
this test compiles the kernels ahead of time in a separate process (TRITON_INTERPRET unset) with
``sfr_kernels.compile_check`` and Triton's bundled ptxas. bfloat16 (the benchmarked head) and
float32 (the head the trainer makes), one time-sampling variant per kernel, to stay fast; ``python -m sfr_kernels.compile_check`` compiles every variant.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO_ROOT = Path(__file__).resolve().parents[2]
PTXAS_DIR = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

CODE = (
    "import json; from sfr_kernels.compile_check import compile_all; "
    "print(json.dumps([r.__dict__ for r in compile_all(('bfloat16', 'float32'), quick=True)]))"
)


@pytest.mark.skipif(not any(PTXAS_DIR.glob("ptxas*")), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CODE], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in results}
    assert kernels == {"flow_inputs_kernel", "linear_silu_kernel", "linear_silu_backward_kernel", "output_loss_kernel",
                       "weight_grad_kernel", "scatter_rows_kernel"}
    for r in results:
        assert 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, r  # the tiles are chosen for no spills (Triton 3.6 and 3.9)
        assert r["shared_bytes"] <= 228 * 1024, r  # H100 shared memory per SM
