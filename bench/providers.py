"""The SFR loss as each benchmark provider computes it (same head weights, same inputs).

* ``torch-eager``        -- what a user would write: the reference math (``sfr_loss(backend="torch")``)
  fed with **native** torch draws, ``x0 = torch.randn(N, M, E)`` and ``s = torch.rand(N, M)``
  (:func:`eager_native_rng_loss`).
* ``torch-compile``      -- ``torch.compile`` of exactly that function, its draws included (inductor
  generates them in-graph); forward and backward are compiled before anything is timed and the
  compile time is reported apart.
* ``torch-eager-philox`` -- the bit-compatible reference, ``sfr_loss(..., seed=seed, backend="torch")``:
  the same draws as the kernels, emulated in int64 by ``sfr_kernels.philox`` (for information: the
  emulation costs hundreds of elementwise passes over ``N·M·E`` values).
* ``triton``             -- the fused kernels, ``sfr_loss(..., seed=seed, backend="triton")``.

Native and Philox draws are different random numbers from the same distributions, so the losses of
``torch-eager``/``torch-compile`` agree with the others only statistically (the harness prints them).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.common import LossShape

PROVIDERS = ("torch-eager", "torch-compile", "torch-eager-philox", "triton")
GPU_COMPILE_MODE = "max-autotune-no-cudagraphs"


@dataclass
class InputSet:
    hidden: torch.Tensor  # [N, D], requires grad
    target: torch.Tensor  # [N, E], unit rows
    seed: torch.Tensor  # 0-dim int64 on the device


@dataclass
class LossFn:
    """A provider's loss: ``fn(inputs) -> 0-dim loss``, its label, and its compile time (s, 0 if none)."""

    fn: Callable[[InputSet], torch.Tensor]
    label: str
    compile_s: float = 0.0


def make_head(shape: LossShape, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A ``FlowHead`` for ``shape`` whose zero-initialised output layer is re-drawn randomly."""
    from sfr.head import FlowHead

    head = FlowHead(shape.D, shape.E, width=shape.width, depth=shape.depth, time_features=shape.time_features)
    head.out.reset_parameters()  # nn.Linear's default (Kaiming-uniform) init: non-zero gradients everywhere
    return head.to(device=device, dtype=dtype)


def make_inputs(shape: LossShape, device: torch.device, dtype: torch.dtype, count: int) -> list[InputSet]:
    """``count`` random input sets (hidden ~ N(0, 1), unit-norm targets), each with its own seed."""
    sets = []
    for i in range(count):
        hidden = torch.randn(shape.N, shape.D, device=device, dtype=dtype).requires_grad_(True)
        target = torch.nn.functional.normalize(torch.randn(shape.N, shape.E, device=device), dim=-1).to(dtype)
        seed = torch.full((), 1000 + i, dtype=torch.int64, device=device)
        sets.append(InputSet(hidden, target, seed))
    return sets


def eager_native_rng_loss(hidden: torch.Tensor, target: torch.Tensor, head: torch.nn.Module,
                          num_samples: int) -> torch.Tensor:
    """The SFR loss as a user would write it: the reference math with ``torch.randn``/``torch.rand`` draws.

    ``x0 ~ N(0, I)`` [N, M, E] and ``s ~ U[0, 1)`` [N, M] in float32 (source_std 1, uniform time),
    then :func:`sfr_kernels.sfr_loss` with them as explicit ``noise``/``time`` (mean reduction).
    """
    from sfr_kernels import sfr_loss

    n, e = target.shape
    noise = torch.randn(n, num_samples, e, device=hidden.device, dtype=torch.float32)
    time_ = torch.rand(n, num_samples, device=hidden.device, dtype=torch.float32)
    return sfr_loss(hidden, target, head, num_samples=num_samples, noise=noise, time=time_, backend="torch")


def make_loss_fn(provider: str, head: torch.nn.Module, shape: LossShape, probe: InputSet,
                 compile_mode: str) -> LossFn:
    """The provider's :class:`LossFn`; ``torch-compile`` compiles forward and backward on ``probe`` first.

    torch-compile tries ``compile_mode`` and then ``"default"``; the label names the mode that compiled
    (``torch-compile:<mode>``).
    """
    from sfr_kernels import sfr_loss

    m = shape.M
    if provider == "torch-eager":
        return LossFn(lambda inp: eager_native_rng_loss(inp.hidden, inp.target, head, m), provider)
    if provider in ("torch-eager-philox", "triton"):
        backend = "torch" if provider == "torch-eager-philox" else "triton"
        return LossFn(lambda inp: sfr_loss(inp.hidden, inp.target, head, num_samples=m, seed=inp.seed,
                                           backend=backend), provider)
    if provider != "torch-compile":
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")

    def native(hidden, target):
        return eager_native_rng_loss(hidden, target, head, m)

    errors = []
    for mode in dict.fromkeys([compile_mode, "default"]):
        torch._dynamo.reset()  # fresh caches per shape: no recompile limit, no stale specialisations
        compiled = torch.compile(native, mode=None if mode == "default" else mode, dynamic=False)
        started = time.monotonic()
        try:
            compiled(probe.hidden, probe.target).backward()  # compiles forward and backward, untimed
        except Exception as error:  # noqa: BLE001 - any compile failure means: try the next mode
            first_line = str(error).splitlines()[0] if str(error) else ""
            errors.append(f"mode={mode}: {type(error).__name__}: {first_line}")
            print(f"  torch-compile {errors[-1]}; trying the next mode", flush=True)
            continue
        finally:
            probe.hidden.grad = None
            head.zero_grad(set_to_none=True)
        compile_s = time.monotonic() - started
        print(f"  torch-compile mode={mode}: compiled forward+backward in {compile_s:.0f} s", flush=True)
        return LossFn(lambda inp, fn=compiled: fn(inp.hidden, inp.target), f"torch-compile:{mode}", compile_s)
    raise RuntimeError("torch.compile failed in every mode: " + "; ".join(errors))


def fused_forward_backward(hidden, target, head, *, seed, num_samples: int) -> list[torch.Tensor]:
    """One forward then one backward (incoming gradient 1) of the fused op's own functions, holding in
    between exactly what its autograd node saves; returns ``[loss, d_hidden, *head gradients]``.

    For the tools that account for the op's work and memory without autograd around it (``bench.work``,
    ``bench.memory``): mean reduction, uniform time, source_std 1, grad_scale 1, every gradient needed.
    """
    from sfr_kernels import fused_loss

    layers = list(head.hidden_layers)
    with torch.no_grad():
        loss, *saved = fused_loss._fused_forward(
            hidden, target, None, seed, None, None, None, head.cond.weight, head.cond.bias, head.in_x.weight,
            head.in_t.weight, head.time_frequencies, [layer.weight for layer in layers],
            [layer.bias for layer in layers], head.out.weight, head.out.bias, num_samples, 1.0, "uniform", 0.0,
            1.0, "mean", True, True)
        grads = fused_loss._fused_backward(torch.ones((), dtype=torch.float32, device=hidden.device), hidden, None,
                                           head.cond.weight, saved, target.shape[1], 1.0, True, True)
    return [loss, *grads]
