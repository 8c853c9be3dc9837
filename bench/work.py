"""Work counter: what the fused SFR op executes for one forward + backward, counted without a GPU.

Run from the repository root (it sets ``TRITON_INTERPRET=1`` itself; a few seconds)::

    python -m bench.work                         # the headline tiling, printed as a table
    python -m bench.work --out work.md           # ... and written as Markdown

Every Triton program instance runs under the Triton interpreter with the **GPU launch
configuration** (the tiles an H100 runs, not the interpreter's), and every elementwise operation,
``tl.dot`` and memory access of every program is counted; torch GEMMs (cuBLAS on a GPU) are counted
by a dispatch mode. A GPU executes the same grid and the same code, so these are the GPU's counts
(the one exception is dead code: Box-Muller's unused ``sin`` branch inside ``tl.randn``, which the
compiler removes, is not counted). The shape is the headline *tiling*: the full encoder width E and
head width Hd, depth and M of the headline, with few anchors N and a small hidden size D (the
interpreter's cost grows with N·M; the counts per row do not depend on N or D).

Counted, and compared with the minimum the math needs:

* **Philox evaluations per source draw**: ``tl.randint4x`` calls (each Philox4x32-10 evaluation runs
  ``tl.umulhi`` 20 times) divided by the ``N·M·E`` source draws. Minimum 1 per pass: the draws are
  generated once in the forward; a backward that regenerates them makes it 2.
* **Transcendental evaluations per row-element** (exp, exp2, log, log2, sin, cos, sqrt, rsqrt, erf;
  ``sigmoid`` is one ``exp``), divided by ``N·M·(E + Hd·depth)``. Minimum: ``3·E`` for the source
  (Box-Muller: log, sqrt, cos) + ``F`` time features (cos/sin) + one ``exp`` per activation in the
  forward (silu) and one in the backward (silu'), i.e. ``(3E + F + 2·Hd·depth) / (E + Hd·depth)``.
* **GEMM multiply-adds**: ``tl.dot`` (full tiles: padding is executed too) plus torch matmuls,
  against the op's GEMM multiply-adds (``bench.common.loss_flops / 2``).
* **Triton load/store bytes** (masked-off elements excluded), against the op's minimum HBM traffic
  (``bench.common.loss_min_bytes``); torch's own memory traffic (GEMM operands, elementwise ops) is not
  included.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit function is defined

import argparse
import collections
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import common
from bench.common import LossShape

TRANSCENDENTALS = ("exp", "exp2", "log", "log2", "sin", "cos", "sqrt", "precise_sqrt", "rsqrt", "erf")
UMULHI_PER_PHILOX = 20  # Philox4x32-10: two 32-bit mulhi per round, ten rounds
# The headline tiling: qwen2.5-7b+mpnet's E, the default head (width 1024, depth 2, F 64), M=4; few anchors.
HEADLINE_TILING = LossShape(N=32, M=4, D=64, E=768)


@dataclass
class KernelWork:
    """What one kernel (or torch) executed: counts summed over all its launches and programs."""

    programs: int = 0
    philox: int = 0
    transcendentals: collections.Counter = field(default_factory=collections.Counter)
    dot_macs: int = 0
    load_bytes: int = 0
    store_bytes: int = 0
    matmul_macs: int = 0  # torch GEMMs (cuBLAS on a GPU)


class WorkCounter:
    """Counts, per kernel, the work of Triton programs under the interpreter and of torch GEMMs.

    Use as a context manager around one forward + backward; ``work`` maps a kernel name (``torch``
    for torch's own GEMMs) to its :class:`KernelWork`.
    """

    def __init__(self):
        self.work: dict[str, KernelWork] = collections.defaultdict(KernelWork)
        self._kernel = "torch"
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        for name in TRANSCENDENTALS:
            self._patch(builder, f"create_{name}", self._transcendental(name))
        self._patch(builder, "create_umulhi", self._umulhi)
        self._patch(builder, "create_dot", self._dot)
        self._patch(builder, "create_load", self._load)
        self._patch(builder, "create_masked_load", self._masked_load)
        self._patch(builder, "create_store", self._store)
        self._patch(builder, "create_masked_store", self._masked_store)
        self._patch(interpreter.GridExecutor, "__call__", self._grid_call)
        self._stack.enter_context(_TorchMatmulCounter(self))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    # -- patching ------------------------------------------------------------------------------

    def _patch(self, cls, name, make_wrapper):
        original = getattr(cls, name)
        setattr(cls, name, make_wrapper(original))
        self._stack.callback(setattr, cls, name, original)

    def _grid_call(self, original):
        counter = self

        def call(executor, *args, **kwargs):
            grid = executor.grid(kwargs) if callable(executor.grid) else executor.grid
            grid = tuple(grid) + (1,) * (3 - len(tuple(grid)))
            counter._kernel = executor.fn.__name__
            counter.work[counter._kernel].programs += grid[0] * grid[1] * grid[2]
            try:
                return original(executor, *args, **kwargs)
            finally:
                counter._kernel = "torch"

        return call

    def _transcendental(self, name):
        def wrap(original):
            counter = self

            def op(builder, arg, *rest):
                if not (name == "sin" and _inside("pair_uniform_to_normal")):  # dead on a GPU (see module doc)
                    counter.work[counter._kernel].transcendentals[name] += arg.data.size
                return original(builder, arg, *rest)

            return op

        return wrap

    def _umulhi(self, original):
        counter = self

        def op(builder, lhs, rhs):
            counter.work[counter._kernel].philox += max(lhs.data.size, rhs.data.size)
            return original(builder, lhs, rhs)

        return op

    def _dot(self, original):
        counter = self

        def op(builder, a, b, d, *rest):
            m, k = a.data.shape[-2:]
            n = b.data.shape[-1]
            counter.work[counter._kernel].dot_macs += m * n * k
            return original(builder, a, b, d, *rest)

        return op

    def _load(self, original):
        counter = self

        def op(builder, ptr, *rest):
            out = original(builder, ptr, *rest)
            counter.work[counter._kernel].load_bytes += out.data.size * out.data.itemsize
            return out

        return op

    def _masked_load(self, original):
        counter = self

        def op(builder, ptrs, mask, *rest):
            out = original(builder, ptrs, mask, *rest)
            active = int(mask.data.sum()) if mask is not None else out.data.size
            counter.work[counter._kernel].load_bytes += active * out.data.itemsize
            return out

        return op

    def _store(self, original):
        counter = self

        def op(builder, ptr, value, *rest):
            counter.work[counter._kernel].store_bytes += value.data.size * value.data.itemsize
            return original(builder, ptr, value, *rest)

        return op

    def _masked_store(self, original):
        counter = self

        def op(builder, ptrs, value, mask, *rest):
            active = int(mask.data.sum()) if mask is not None else value.data.size
            counter.work[counter._kernel].store_bytes += active * value.data.itemsize
            return original(builder, ptrs, value, mask, *rest)

        return op


def _inside(function_name: str) -> bool:
    """Whether a Python frame of ``function_name`` is on the stack (the interpreter runs jit helpers as Python)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == function_name:
            return True
        frame = frame.f_back
    return False


class _TorchMatmulCounter(TorchDispatchMode):
    """Multiply-adds of torch's GEMMs (``mm``, ``addmm``, ``bmm``, ``baddbmm``) outside Triton programs."""

    def __init__(self, counter: WorkCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm"):
            a, b = args[0], args[1]
        elif name in ("addmm", "baddbmm"):
            a, b = args[1], args[2]
        else:
            a = b = None
        if a is not None and self.counter._kernel == "torch":
            batch = a.shape[0] if a.dim() == 3 else 1
            self.counter.work["torch"].matmul_macs += batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# One forward + backward of the fused op


def _fused_forward_backward(shape: LossShape, dtype: torch.dtype) -> None:
    """Run the fused op's forward and backward once with the GPU's tiles (``SFR_KERNELS_TILES=gpu``)."""
    from bench.providers import fused_forward_backward, make_head
    from sfr_kernels.launch import TILES_ENV

    torch.manual_seed(0)
    head = make_head(shape, torch.device("cpu"), dtype)
    hidden = torch.randn(shape.N, shape.D, dtype=dtype)
    target = torch.nn.functional.normalize(torch.randn(shape.N, shape.E), dim=-1).to(dtype)
    previous = os.environ.get(TILES_ENV)
    os.environ[TILES_ENV] = "gpu"
    try:
        loss, *_ = fused_forward_backward(hidden, target, head, seed=torch.tensor(7), num_samples=shape.M)
    finally:
        if previous is None:
            del os.environ[TILES_ENV]
        else:
            os.environ[TILES_ENV] = previous
    if not torch.isfinite(loss):
        raise RuntimeError("the fused op returned a non-finite loss")


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class WorkSummary:
    shape: LossShape
    dtype: torch.dtype
    per_kernel: dict[str, KernelWork]

    def total(self, attribute: str) -> int:
        return sum(getattr(work, attribute) for work in self.per_kernel.values())

    @property
    def rows(self) -> int:
        return self.shape.N * self.shape.M

    @property
    def source_draws(self) -> int:
        return self.rows * self.shape.E

    @property
    def row_elements(self) -> int:
        return self.rows * (self.shape.E + self.shape.width * self.shape.depth)

    def philox_per_draw(self) -> float:
        return self.total("philox") / UMULHI_PER_PHILOX / self.source_draws

    def transcendentals(self) -> int:
        return sum(sum(work.transcendentals.values()) for work in self.per_kernel.values())

    def transcendentals_per_row_element(self) -> float:
        return self.transcendentals() / self.row_elements

    def min_transcendentals_per_row_element(self) -> float:
        s = self.shape
        return (3 * s.E + s.time_features + 2 * s.width * s.depth) / (s.E + s.width * s.depth)

    def gemm_macs(self) -> int:
        return self.total("dot_macs") + self.total("matmul_macs")

    def min_gemm_macs(self) -> float:
        return common.loss_flops(self.shape, "full") / 2

    def triton_bytes(self) -> int:
        return self.total("load_bytes") + self.total("store_bytes")

    def min_bytes(self) -> float:
        return common.loss_min_bytes(self.shape, "full", torch.finfo(self.dtype).bits // 8)


def count_work(shape: LossShape = HEADLINE_TILING, dtype: torch.dtype = torch.bfloat16) -> WorkSummary:
    """Count one forward + backward of the fused op at ``shape`` (head dtype ``dtype``)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("bench.work counts under the Triton interpreter: set TRITON_INTERPRET=1 before "
                           "importing triton (python -m bench.work does)")
    import numpy as np

    # The interpreter computes in numpy: silu of large bf16 values overflows exp harmlessly (inf -> 0).
    with WorkCounter() as counter, np.errstate(over="ignore", invalid="ignore"):
        _fused_forward_backward(shape, dtype)
    return WorkSummary(shape, dtype, dict(counter.work))


def render(summary: WorkSummary) -> str:
    """The work table (Markdown): totals against the minimum, then the per-kernel breakdown."""
    s = summary.shape
    lines = [
        f"Work of one forward + backward, counted under the Triton interpreter with the GPU tiles "
        f"(`python -m bench.work`): E={s.E}, width={s.width}, depth={s.depth}, F={s.time_features}, M={s.M}, "
        f"N={s.N}, D={s.D}, {common.DTYPE_NAMES[summary.dtype]}, uniform time, grad_scale 1.",
        "",
        "| work, one forward + backward | counted | minimum the math needs | ratio |",
        "|---|---:|---:|---:|",
        f"| Philox evaluations per source draw | {summary.philox_per_draw():.2f} | 1 (2 if the backward regenerates) "
        f"| {summary.philox_per_draw():.2f}× |",
        f"| transcendentals per row-element (E + width·depth) | {summary.transcendentals_per_row_element():.2f} "
        f"| {summary.min_transcendentals_per_row_element():.2f} "
        f"| {summary.transcendentals_per_row_element() / summary.min_transcendentals_per_row_element():.2f}× |",
        f"| GEMM multiply-adds (`tl.dot` + torch) | {summary.gemm_macs():,} | {summary.min_gemm_macs():,.0f} "
        f"| {summary.gemm_macs() / summary.min_gemm_macs():.3f}× |",
        f"| Triton load + store bytes | {summary.triton_bytes():,} | {summary.min_bytes():,.0f} (whole op) "
        f"| {summary.triton_bytes() / summary.min_bytes():.2f}× |",
        "",
        "| kernel | programs | Philox / draw | transcendentals / row-element | tl.dot MACs | torch GEMM MACs "
        "| load bytes | store bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, work in sorted(summary.per_kernel.items()):
        lines.append(
            f"| {name} | {work.programs:,} | {work.philox / UMULHI_PER_PHILOX / summary.source_draws:.2f} "
            f"| {sum(work.transcendentals.values()) / summary.row_elements:.2f} | {work.dot_macs:,} "
            f"| {work.matmul_macs:,} | {work.load_bytes:,} | {work.store_bytes:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.work", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", type=int, default=HEADLINE_TILING.N, help="anchors (default: %(default)s)")
    parser.add_argument("--M", type=int, default=HEADLINE_TILING.M, help="samples per anchor (default: %(default)s)")
    parser.add_argument("--D", type=int, default=HEADLINE_TILING.D, help="hidden size (default: %(default)s)")
    parser.add_argument("--E", type=int, default=HEADLINE_TILING.E, help="embedding size (default: %(default)s)")
    parser.add_argument("--width", type=int, default=HEADLINE_TILING.width, help="head width (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=HEADLINE_TILING.depth, help="head depth (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16",
                        help="head dtype (default: %(default)s; counts only, the interpreter's bf16 values are not used)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    shape = LossShape(N=args.N, M=args.M, D=args.D, E=args.E, width=args.width, depth=args.depth)
    summary = count_work(shape, common.DTYPES[args.dtype])
    common.show(render(summary), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
