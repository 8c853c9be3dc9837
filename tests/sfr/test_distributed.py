"""``sfr train`` sharded with FSDP2 and FSDP1 on the CPU (2 processes, gloo): the fused SFR loss runs, the
run says so in ``sfr_run.json``, and the weights equal those of one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "distributed"

# The command of issue 13 (default SFR objective: its source and time draws are the same as one process's,
# because every rank passes the anchors of the ranks before it as the loss's anchor_offset). Plain SGD and a
# constant rate make weights mirror gradients; a narrow head (the interpreter is slow); 2 steps with the
# embedded default's phases scaled: lambda = 1 from step 0, so the SFR gradient reaches the backbone through
# the sharded head at both steps.
FLAGS = ["--use-cpu", "--loss-backend", "triton", "--max-steps", "2", "--seed", "7",
         "--lr-scheduler-type", "constant", "--logging-steps", "1", "--save-strategy", "no", "--optim", "sgd",
         "--learning-rate", "0.1", "--head-width", "64", "--disable-tqdm", "true"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _sfr_train(out: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "sfr", "train", "--output-dir", str(out), *FLAGS, *extra]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _weights(out: Path) -> dict:
    weights = {f"model/{k}": v for k, v in load_file(out / "model.safetensors").items()}
    weights.update({f"head/{k}": v for k, v in load_file(out / "sfr_head" / "model.safetensors").items()})
    return weights


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    _sfr_train(out, "--per-device-train-batch-size", "8")
    return out


@pytest.mark.parametrize("config", ["fsdp2.json", "fsdp1.json"])
def test_sharded_sfr_train_on_cpu_matches_one_process(tmp_path, one_process, config):
    out = tmp_path / "run"
    done = _sfr_train(out, "--fsdp", "full_shard", "--fsdp-config", str(EXAMPLES / config),
                      "--per-device-train-batch-size", "4", processes=2)
    version = json.loads((EXAMPLES / config).read_text())["fsdp_version"]
    record = json.loads((out / "sfr_run.json").read_text())
    assert record["sfr_loss_backend"] == "triton" and record["fallback_reason"] is None
    assert (record["distributed"], record["fsdp_version"], record["world_size"]) == ("fsdp", version, 2)
    assert record["observed"] and record["objective"] == "sfr" and record["sfr_config"]["source_std"] == 1.0
    assert f"sfr_loss: triton (fused kernels) | distributed: fsdp (FSDP{version}), world_size 2" in done.stderr
    single, sharded = _weights(one_process), _weights(out)
    assert json.loads((one_process / "sfr_run.json").read_text())["distributed"] == "none"
    # A tied lm_head is gathered by FSDP as a tensor of its own (equal to the embeddings); one process drops it.
    tied = "model/lm_head.weight"
    if tied in sharded and tied not in single:
        torch.testing.assert_close(sharded.pop(tied), sharded["model/model.embed_tokens.weight"], rtol=0, atol=0)
    assert sharded.keys() == single.keys()
    initial_head_out = "head/out.weight"  # zero-initialised: it moved, so the head's gradients were applied
    assert single[initial_head_out].abs().max() > 0
    for key, value in single.items():
        assert (sharded[key] - value).abs().max() <= 1e-5, key


def test_gradient_accumulation_offsets_every_micro_batch(tmp_path):
    """FSDP2, 2 processes x batch 2 x 2 accumulated micro-batches = one process x batch 4 x 2: every
    micro-batch's anchors are offset by those on the rank before it (rank 0 has rows 0-1 of each
    single-process micro-batch, rank 1 rows 2-3), so the weights are equal again."""
    accumulate = ["--gradient-accumulation-steps", "2"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _sfr_train(single, "--per-device-train-batch-size", "4", *accumulate)
    _sfr_train(sharded, "--fsdp", "full_shard", "--fsdp-config", str(EXAMPLES / "fsdp2.json"),
               "--per-device-train-batch-size", "2", *accumulate, processes=2)
    one, two = _weights(single), _weights(sharded)
    if "model/lm_head.weight" not in one:  # tied: FSDP gathers it as a tensor of its own (see above)
        two.pop("model/lm_head.weight", None)
    assert two.keys() == one.keys()
    for key, value in one.items():
        assert (two[key] - value).abs().max() <= 1e-5, key

