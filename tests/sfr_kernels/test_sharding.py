"""The fused loss on a head sharded by FSDP2, FSDP1 and DeepSpeed ZeRO-3 (2 CPU processes, gloo), and the
head-call path of a head with hooks of its own (one process)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fused_loss import GRAD_TOL, LOSS_TOL, make_head, run

from sfr_kernels import head_support, loss_path, sharding

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs CUDA or the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)",
)

WORKER = Path(__file__).with_name("sharding_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_sharded_heads_run_the_fused_kernels_and_match_one_process(tmp_path):
    """Each engine gathers the head's weights for the loss's call of the head and reduces the gradients the op
    gives them over the ranks: the head's gradients equal one process's gradients of the mean of both ranks'
    losses, the hidden gradients each rank's own, at lambda = 0.5 and at 0 (no input needs a gradient)."""
    engines = ["fsdp2", "fsdp1"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(out), ",".join(engines)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(f"{e}/{s}" for e in engines for s in (0.5, 0.0))
    for key, result in results.items():
        assert result["fused_calls"] == 1 and result["reference_calls"] == 0, key
        assert result["grad_names_match"], key
        assert result["loss_error"] <= 1e-5, key
        assert result["grad_error"] <= 1e-4 * result["grad_scale_of_max"] + 1e-6, key
        assert result["hidden_error"] <= 1e-6, key
    # FSDP2 with a layer of the head sharded on its own: its weights are not gathered by the head's call.
    assert "head.cond is sharded on its own" in results["fsdp2/0.5"]["layered_reason"]


def test_hooks_on_the_head_itself_run_around_the_fused_loss():
    """A head with hooks of its own (as an engine registers) gets the loss computed inside its call: the
    hooks see that call, and the result is the reference's."""
    d, e = 12, 10
    head = make_head(d, e, width=16, time_features=8)
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(tuple(a.shape for a in args[:2])))
    hidden, target = torch.randn(2, 5, d), torch.nn.functional.normalize(torch.randn(4, e), dim=-1)
    kwargs = dict(anchor_index=torch.tensor([0, 3, 6, 9]), num_samples=2, seed=3, grad_scale=0.7)
    assert head_support.unsupported_head_reason(head) is None and sharding.runs_in_call(head)
    assert loss_path(hidden, target, head, backend="triton").backend == "triton"
    loss, grads = run("triton", hidden, target, head, **kwargs)
    assert seen == [((2, 5, d), (4, e))]  # the loss's own call: hidden and target went through the head's call
    assert "forward" not in vars(head)  # the call's forward is gone again
    want_loss, want = run("torch", hidden, target, head, **kwargs)
    assert len(seen) > 1  # the reference calls the head too
    torch.testing.assert_close(loss, want_loss, **LOSS_TOL)
    for name, grad in want.items():
        torch.testing.assert_close(grads[name], grad, **GRAD_TOL, msg=name)


def test_loss_path_names_the_backend_and_the_reason():
    d, e = 12, 10
    head = make_head(d, e, width=16, time_features=8)
    hidden, target = torch.randn(3, d), torch.randn(3, e)
    assert loss_path(hidden, target, head, backend="torch").backend == "torch"
    assert loss_path(hidden, target, head).fallback_reason is None  # auto on the CPU: the reference, by choice
    assert loss_path(hidden, target, head, backend="triton") == loss_path(hidden, target, head, backend="triton")
    assert loss_path(hidden, target, head, backend="triton").backend == "triton"
    head.in_x.register_forward_hook(lambda module, args, output: output)
    path = loss_path(hidden, target, head, backend="triton")
    assert path.backend == "torch" and "head.in_x has forward hooks" in path.fallback_reason
    grad_target = target.clone().requires_grad_(True)
    assert "target" in loss_path(hidden, grad_target, make_head(d, e, width=16, time_features=8),
                                 backend="triton").fallback_reason
