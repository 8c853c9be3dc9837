"""Distributed set-ups the Trainer gets from accelerate, and the one gap this library closes.

accelerate turns ``--fsdp`` into FSDP only on accelerators: on a multi-process CPU run (gloo) it keeps
the ``MULTI_CPU`` (DDP) set-up and drops the FSDP plugin without a word, so ``--fsdp full_shard`` would
train with DDP. PyTorch's FSDP1 and FSDP2 both run on the CPU with gloo, and this is how the sharded
path is tested without a GPU: :func:`enable_fsdp_on_cpu` gives the Trainer's accelerator the FSDP
set-up it asked for. Where accelerate still cannot (DeepSpeed needs an accelerator in accelerate),
nothing is changed and the run says so through ``sfr_run.json`` (``distributed``).
"""
from __future__ import annotations

import torch


def enable_fsdp_on_cpu(trainer) -> bool:
    """Give ``trainer.accelerator`` the FSDP set-up of ``trainer.args`` on a multi-process CPU run.

    Call right after the Trainer created its accelerator (``create_accelerator_and_postprocess``).
    Returns whether it changed anything. ``ValueError`` when ``--fsdp`` was given but the accelerator
    runs another multi-process set-up that is not FSDP (a silent downgrade).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    args, accelerator = trainer.args, trainer.accelerator
    state = accelerator.state
    if args.fsdp_plugin_args is None or getattr(state, "fsdp_plugin", None) is not None:
        return False
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        # As accelerate's own FSDP set-up does: a later AcceleratorState() copies the partial state back.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if state.fsdp_plugin.fsdp_version == 1:
            _fsdp1_on_cpu(state)
        trainer.is_fsdp_enabled = True
        return True
    if state.distributed_type != DistributedType.NO:
        raise ValueError(f"--fsdp: accelerate set up {state.distributed_type} instead of FSDP")
    return False  # one process: nothing to shard, as the Trainer does on a GPU


def _fsdp1_on_cpu(state) -> None:
    """Two things FSDP1 (torch 2.13) needs on the CPU that accelerate's GPU defaults get wrong."""
    from accelerate.state import PartialState
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig

    # accelerate passes its device as FSDP1's device_id; FSDP1 compares it with the parameters' device,
    # "cpu", and refuses accelerate's "cpu:0".
    state.device = PartialState._shared_state["device"] = torch.device("cpu")
    # Gathering a full state dict with offload_to_cpu=True crashes (SIGSEGV) when the shards already
    # are on the CPU; there is nothing to offload anyway.
    state.fsdp_plugin.state_dict_config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    state.fsdp_plugin.optim_state_dict_config = FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)


def fsdp1_cpu_state_dict(trainer) -> dict | None:
    """The full state dict of an FSDP1 model on the CPU (rank 0; empty elsewhere), or None in any other set-up.

    ``Accelerator.get_state_dict`` gathers FSDP1 models with ``offload_to_cpu=True``, which crashes when
    the shards already are on the CPU; this gathers without offloading.
    """
    if not trainer.is_fsdp_enabled or trainer.accelerator.is_fsdp2 or trainer.args.device.type != "cpu":
        return None
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FSDP.state_dict_type(trainer.model, StateDictType.FULL_STATE_DICT, config):
        return trainer.model.state_dict()


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float, sharded: bool = False) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` of one group of parameters, plain or sharded: every rank scales
    by the 2-norm of the whole group's gradient, as one process would.

    FSDP2 gradients are DTensor shards (their norm is reduced with ``full_tensor``); FSDP1 gradients
    (``sharded=True``) are each rank's disjoint shards of flat gradients, so the squared norm is summed
    over the ranks, as ``FullyShardedDataParallel.clip_grad_norm_`` does for all parameters at once.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not torch.distributed.is_available():
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    from torch.distributed.tensor import DTensor

    if any(isinstance(g, DTensor) for g in grads):
        from torch.nn.utils import clip_grads_with_norm_, get_total_norm

        norm = get_total_norm(grads)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    elif sharded:
        from torch.nn.utils import clip_grads_with_norm_

        squares = sum((g.detach().float().pow(2).sum() for g in grads), torch.zeros((), device=grads[0].device))
        torch.distributed.all_reduce(squares)
        norm = squares.sqrt()
    else:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
