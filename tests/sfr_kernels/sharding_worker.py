"""Run by ``test_sharding.py`` under torchrun (2 CPU processes, gloo): the fused loss on a head sharded by
FSDP2, FSDP1 (``use_orig_params``) and DeepSpeed ZeRO-3, against one process computing the same.

Each rank r computes the loss of its own data (``data(r)``) and backpropagates; the engine reduces the
head's gradients over the ranks (their mean). Expected, computed on every rank without any engine: the
mean over both ranks' data of the reference loss's gradients. Rank 0 saves, per engine, the largest
differences and how many times the fused op ran (``_fused_call``) and the reference did (``sfr_loss_reference``).

Usage: ``python -m torch.distributed.run --nproc_per_node 2 sharding_worker.py OUT_FILE ENGINE[,ENGINE...]``.
"""
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

import sfr_kernels.fused_loss as fused_loss
from sfr import FlowHead
from sfr_kernels import loss_path, sfr_loss

D, E, WIDTH, FEATURES, B, T, N, M = 24, 16, 32, 16, 2, 8, 6, 2
GRAD_SCALE = 0.5


def make_head() -> FlowHead:
    torch.manual_seed(0)
    head = FlowHead(D, E, width=WIDTH, depth=2, time_features=FEATURES)
    with torch.no_grad():  # the output layer starts at zero: give it weights so every gradient is non-zero
        head.out.weight.normal_(0, 0.1)
        head.out.bias.normal_(0, 0.1)
    return head


def data(rank: int):
    """``hidden [B, T, D]``, ``target [N, E]``, ``anchor_index [N]``, ``seed`` of rank ``rank``."""
    generator = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(B, T, D, generator=generator)
    target = nn.functional.normalize(torch.randn(N, E, generator=generator), dim=-1)
    index = torch.randperm(B * T, generator=generator)[:N]
    return hidden, target, index, 1000 + rank


def loss_kwargs(index, seed, grad_scale):
    return dict(anchor_index=index, num_samples=M, seed=seed, grad_scale=grad_scale, reduction="sum")


def expected(grad_scale):
    """The reference's gradients of the mean over both ranks' losses, with no engine (names of FlowHead)."""
    head = make_head()
    hidden_grads = []
    for rank in range(2):
        hidden, target, index, seed = data(rank)
        hidden.requires_grad_(True)
        (sfr_loss(hidden, target, head, backend="torch", **loss_kwargs(index, seed, grad_scale)) / 2).backward()
        hidden_grads.append(hidden.grad)
    return {name: p.grad for name, p in head.named_parameters()}, hidden_grads


class Counter:
    """Counts calls of ``module.name`` (which must stay callable as before)."""

    def __init__(self, module, name):
        self.calls, original = 0, getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        setattr(module, name, counted)


FUSED = Counter(fused_loss, "_fused_call")
REFERENCE = Counter(fused_loss, "sfr_loss_reference")


def run_fsdp2(grad_scale):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    head = make_head()
    fully_shard(head, mesh=init_device_mesh("cpu", (2,)))
    loss, hidden_grad = _step(head, head, grad_scale)
    grads = {name: p.grad.full_tensor() for name, p in head.named_parameters()}
    # A layer sharded on its own is gathered only by its own call, which the op never makes: the reference runs.
    layered = make_head()
    fully_shard(layered.cond, mesh=init_device_mesh("cpu", (2,)))
    fully_shard(layered, mesh=init_device_mesh("cpu", (2,)))
    hidden, target, _, _ = data(0)
    return loss, grads, hidden_grad, loss_path(hidden, target, layered, backend="triton").fallback_reason


def run_fsdp1(grad_scale):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    head = FSDP(make_head(), use_orig_params=True, device_id=torch.device("cpu"))
    loss, hidden_grad = _step(head, head, grad_scale)
    with FSDP.summon_full_params(head, with_grads=True):
        grads = {name.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for name, p in head.named_parameters()}
    return loss, grads, hidden_grad, None


class LossModel(nn.Module):
    """What DeepSpeed wraps: a module whose forward computes the SFR loss of ``self.head`` (as SFRModel does)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden, target, index, seed, grad_scale):
        return sfr_loss(hidden, target, self.head, backend="triton", **loss_kwargs(index, seed, grad_scale))


def run_deepspeed(grad_scale):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "overlap_comm": False}, "wall_clock_breakdown": False}
    model = LossModel(make_head())
    engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    hidden, target, index, seed = data(dist.get_rank())
    hidden.requires_grad_(True)
    loss = engine(hidden, target, index, seed, grad_scale)
    engine.backward(loss)
    grads = {name.replace("head.", "", 1): safe_get_full_grad(p).clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, hidden.grad, None


def _step(call_head, head, grad_scale):
    hidden, target, index, seed = data(dist.get_rank())
    hidden.requires_grad_(True)
    loss = sfr_loss(hidden, target, call_head, backend="triton", **loss_kwargs(index, seed, grad_scale))
    loss.backward()
    return loss.detach(), hidden.grad


ENGINES = {"fsdp2": run_fsdp2, "fsdp1": run_fsdp1, "deepspeed": run_deepspeed}


def main(out: str, engines: str) -> None:
    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name in engines.split(","):
        for grad_scale in (GRAD_SCALE, 0.0):
            fused_before, reference_before = FUSED.calls, REFERENCE.calls
            loss, grads, hidden_grad, layered_reason = ENGINES[name](grad_scale)
            want, want_hidden = expected(grad_scale)
            hidden, target, index, seed = data(rank)
            want_loss = sfr_loss(hidden, target, make_head(), backend="torch", **loss_kwargs(index, seed, grad_scale))
            # DDP-style engines average the ranks' gradients; the hidden gradient is this rank's alone (x 2: the
            # expected one is of the mean of the two losses).
            hidden_error = (0.0 if grad_scale == 0 and hidden_grad is None
                            else float((hidden_grad - 2 * want_hidden[rank]).abs().max()))
            results[f"{name}/{grad_scale}"] = {
                "loss_error": float((loss - want_loss).abs()),
                "grad_error": max(float((grads[k] - want[k]).abs().max()) for k in want),
                "grad_scale_of_max": max(float(g.abs().max()) for g in want.values()),
                "hidden_error": hidden_error,
                "grad_names_match": sorted(grads) == sorted(want),
                "fused_calls": FUSED.calls - fused_before,
                "reference_calls": REFERENCE.calls - reference_before,
                "layered_reason": layered_reason,
            }
            dist.barrier()
    if rank == 0:
        with open(out, "w") as file:
            json.dump(results, file, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
