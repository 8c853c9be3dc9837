"""Peak memory of the SFR op, measured without a GPU by allocation accounting.

Run from the repository root (about a minute)::

    python -m bench.memory                       # headline shape, bf16: eager, eager-philox, triton
    python -m bench.memory --N 4096 --out m.md   # another N, also written as Markdown

How: the op's memory depends on the sizes and lifetimes of the tensors it allocates, not on the
device, so every provider runs on PyTorch's ``meta`` device (shapes and dtypes, no data, no
arithmetic) under a dispatch mode that records every storage an operation creates and when it is
freed. The peak of the live bytes over one forward + backward, beyond what existed before (the inputs
and the head's weights), is the op's peak memory -- what ``torch.cuda.max_memory_allocated`` minus
the allocation before the call measures on a GPU, without the caching allocator's rounding. The fused
provider's Triton kernels are not launched (they cannot run on ``meta``): only the buffers its
launchers allocate with torch count, which is all a kernel can use (they allocate nothing themselves).

Providers (``bench.providers``): ``torch-eager`` (native draws), ``torch-eager-philox`` (the
bit-compatible reference, whose int64 Philox emulation keeps ~16 ``[N·M, E]`` int64 temporaries alive),
and ``triton`` (the fused op: its forward then its backward, holding exactly what its autograd node
saves in between).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench import common
from bench.common import LossShape

PROVIDERS = ("torch-eager", "torch-eager-philox", "triton")


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the storages created by operations run inside it.

    Storages that existed before (``ignore``) are never counted; views share their base's storage, so
    a storage counts once, from the operation that created it until it is freed.
    """

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._known: set[int] = set()
        self._external = {id(t.untyped_storage()) for t in existing if isinstance(t, torch.Tensor)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._record(tensor.untyped_storage())
        return out

    def _record(self, storage) -> None:
        key = id(storage)
        if key in self._known or key in self._external:
            return
        nbytes = storage.nbytes()
        self._known.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._known.discard(key)
        self.live -= nbytes


@contextlib.contextmanager
def kernels_not_launched():
    """Replace every Triton kernel of ``sfr_kernels`` by a no-op launcher (they cannot run on ``meta``)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import sfr_kernels

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    patched = []
    for info in pkgutil.iter_modules(sfr_kernels.__path__):
        module = importlib.import_module(f"sfr_kernels.{info.name}")
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction) or type(value).__name__ == "InterpretedFunction":
                patched.append((module, name, value))
                setattr(module, name, _NoLaunch())
    try:
        yield
    finally:
        for module, name, value in patched:
            setattr(module, name, value)


def peak_bytes(provider: str, shape: LossShape, dtype: torch.dtype) -> int:
    """Peak bytes one forward + backward of ``provider`` allocates beyond its inputs (meta device)."""
    from bench.providers import eager_native_rng_loss, make_head
    from sfr_kernels import sfr_loss

    device = torch.device("meta")
    head = make_head(shape, device, dtype)
    hidden = torch.empty(shape.N, shape.D, device=device, dtype=dtype, requires_grad=True)
    target = torch.empty(shape.N, shape.E, device=device, dtype=dtype)
    seed = torch.empty((), dtype=torch.int64, device=device)
    inputs = [hidden, target, seed, *head.parameters(), *head.buffers()]
    if provider == "triton":
        from bench.providers import fused_forward_backward

        with kernels_not_launched(), AllocationTracker(*inputs) as tracker:
            fused_forward_backward(hidden, target, head, seed=seed, num_samples=shape.M)
        return tracker.peak
    with AllocationTracker(*inputs) as tracker:
        if provider == "torch-eager":
            loss = eager_native_rng_loss(hidden, target, head, shape.M)
        elif provider == "torch-eager-philox":
            loss = sfr_loss(hidden, target, head, num_samples=shape.M, seed=seed, backend="torch")
        else:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
        loss.backward()
        del loss
    return tracker.peak


@dataclass
class MemoryReport:
    shape: LossShape
    dtype: torch.dtype
    peak: dict[str, int]

    def render(self) -> str:
        s, mib = self.shape, 2**20
        lines = [
            f"Peak memory of one forward + backward beyond the inputs, by allocation accounting on the meta "
            f"device (`python -m bench.memory`; device-independent, no caching-allocator rounding): "
            f"N={s.N}, M={s.M}, D={s.D}, E={s.E}, width={s.width}, depth={s.depth}, "
            f"{common.DTYPE_NAMES[self.dtype]}.",
            "",
            "| provider | peak MiB | triton / provider |",
            "|---|---:|---:|",
        ]
        fused = self.peak.get("triton")
        for provider, nbytes in self.peak.items():
            ratio = f"{fused / nbytes:.3f}" if fused is not None and provider != "triton" else ""
            lines.append(f"| {provider} | {nbytes / mib:,.1f} | {ratio} |")
        return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d, e = common.preset_dims(common.HEADLINE_PRESET)
    parser.add_argument("--N", type=int, default=16384, help="anchors (default: %(default)s)")
    parser.add_argument("--M", type=int, default=4, help="samples per anchor (default: %(default)s)")
    parser.add_argument("--D", type=int, default=d, help="hidden size (default: %(default)s)")
    parser.add_argument("--E", type=int, default=e, help="embedding size (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16", help="default: %(default)s")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                        help="default: all")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    shape, dtype = LossShape(N=args.N, M=args.M, D=args.D, E=args.E), common.DTYPES[args.dtype]
    report = MemoryReport(shape, dtype, {p: peak_bytes(p, shape, dtype) for p in args.providers})
    common.show(report.render(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
