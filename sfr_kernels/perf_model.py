"""A static performance model of the fused SFR op, built from the real SASS -- an ESTIMATE, not a measurement.

``python -m sfr_kernels.compile_check --model`` uses it. How it works:

1. **Launch plan.** The fused forward and backward run once on the ``meta`` device (shapes only, no
   GPU, no arithmetic) with every Triton launch replaced by a recorder (:func:`record_launches`):
   each launch's kernel, grid, constexprs and scalar arguments, each torch GEMM's multiply-adds and each
   other torch operation's bytes. So the plan is the code's own sequence of launches, not a copy of it.
2. **Instructions per program.** Each launched kernel variant is compiled for sm_90a and disassembled
   (``cuobjdump -sass``). Its control-flow graph (basic blocks; back edges by dominance) gives the
   *fewest* warp-instructions any program can issue: the shortest path from entry to ``EXIT``, each
   block weighted by the trip counts of the loops that contain it (:data:`LOOP_TRIPS`: the GEMM K-loop,
   the draw kernel's column loops), every conditional branch taken the cheapest way (so rarely taken
   slow paths -- IEEE division, large-argument sin/cos -- are not counted, and neither are masked-off
   tails). Times the warps per program and the grid: the warp-instructions the kernel issues, at least.
3. **Time bound per kernel.** On the busiest SM (``ceil(programs / SMs)`` programs): issue time at 4
   warp-instructions per clock, tensor-core time at the dense peak (FLOPs from the HGMMA shapes in the
   SASS). With two or more programs resident per SM (registers, shared memory, warps), one's tensor work
   overlaps another's instructions: the larger of the two. With one, only the main loop overlaps its own
   tensor work; the epilogue after it adds. The kernel's bound is the larger of that and its memory
   time (each distinct tensor argument once, at the HBM bandwidth). torch's cuBLAS GEMMs are charged at a stated sustained rate, its other operations at the HBM
   bandwidth.

Everything here is a lower bound under stated assumptions (perfect overlap inside a kernel, none
between kernels, no launch latency, no cache misses beyond compulsory traffic). It ranks tiles; it does
not replace a GPU run.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import pkgutil
import re
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class Device:
    """The numbers the model uses (NVIDIA's published H100 SXM figures)."""

    name: str = "H100 SXM (H200: same SMs and tensor cores, 4.8 TB/s HBM)"
    sms: int = 132
    clock_ghz: float = 1.83  # the clock of the published dense tensor peak (989 TFLOP/s bf16)
    issue_per_clock: int = 4  # warp-instructions per clock per SM (4 schedulers)
    tensor_flops_per_clock: dict = field(default_factory=lambda: {"bf16": 4096, "fp16": 4096, "tf32": 2048,
                                                                  "fp32": 256})
    registers: int = 65536
    shared_bytes: int = 228 * 1024
    max_warps: int = 64
    hbm_tb_s: float = 3.35
    cublas_tflops: float = 700.0  # stated sustained rate of cuBLAS bf16 GEMMs at these sizes (~70 % of peak)


# ---------------------------------------------------------------------------------------------
# 1. Launch plan


@dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: tuple
    args: dict  # name -> value (tensors as (shape, dtype), scalars as is)
    constexprs: dict  # constexpr name -> value, plus num_warps / num_stages

    @property
    def name(self) -> str:
        return self.kernel.__name__


@dataclass
class Plan:
    launches: list[Launch] = field(default_factory=list)
    gemm_flops: list[tuple[str, float]] = field(default_factory=list)  # torch GEMMs (cuBLAS)
    other_bytes: list[tuple[str, int]] = field(default_factory=list)  # other torch operations


class _Recorder:
    def __init__(self, kernel, plan: Plan):
        self.kernel, self.plan = kernel, plan

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = self.kernel.arg_names
            values = dict(zip(names, args), **kwargs)
            shown = {k: ((tuple(v.shape), v.dtype, id(v.untyped_storage())) if isinstance(v, torch.Tensor) else v)
                     for k, v in values.items()}
            constexprs = {k: v for k, v in values.items() if k.isupper() or k in ("num_warps", "num_stages")}
            self.plan.launches.append(Launch(self.kernel, tuple(grid) + (1,) * (3 - len(grid)), shown, constexprs))

        return launch


class _TorchWork(TorchDispatchMode):
    """torch GEMMs (multiply-adds) and the bytes of every other torch operation, on the meta device."""

    GEMMS = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1)}

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.GEMMS:
            i, j = self.GEMMS[name]
            a, b = args[i], args[j]
            self.plan.gemm_flops.append((name, 2.0 * math.prod(a.shape) * b.shape[-1]))
        elif not func.is_view and name not in ("empty", "empty_strided", "empty_like", "detach", "lift_fresh"):
            moved = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in moved)
            if nbytes:
                self.plan.other_bytes.append((name, nbytes))
        return out


@contextlib.contextmanager
def record_launches(plan: Plan | None = None):
    """Replace every Triton kernel of ``sfr_kernels`` by a recorder (nothing is launched); yields the
    :class:`Plan` the recorded launches and torch operations are appended to."""
    from triton.runtime.jit import JITFunction

    import sfr_kernels

    plan = plan if plan is not None else Plan()
    patched = []
    for info in pkgutil.iter_modules(sfr_kernels.__path__):
        if info.name in ("compile_check", "perf_model"):
            continue
        module = importlib.import_module(f"sfr_kernels.{info.name}")
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction) or type(value).__name__ == "InterpretedFunction":
                patched.append((module, name, value))
                setattr(module, name, _Recorder(value, plan))
    try:
        yield plan
    finally:
        for module, name, value in patched:
            setattr(module, name, value)


def headline_plan(n=16384, m=4, d=3584, e=768, width=1024, depth=2, features=64, dtype=torch.bfloat16) -> Plan:
    """The launches of one fused forward + backward (all gradients, grad_scale 1) at a shape, on ``meta``."""
    from sfr_kernels import fused_loss
    from sfr_kernels.reference import timestep_frequencies

    meta = torch.device("meta")

    def empty(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=meta)

    hidden, target, seed = empty(n, d), empty(n, e), empty(dt=torch.int64)
    hidden_weights = [empty(width, width) for _ in range(depth - 1)]
    hidden_biases = [empty(width) for _ in range(depth - 1)]
    freq = timestep_frequencies(features).to(device=meta, dtype=dtype)
    plan = Plan()
    with record_launches(plan), _TorchWork(plan), torch.no_grad():
        loss, *saved = fused_loss._fused_forward(
            hidden, target, None, seed, None, None, None, empty(width, d), empty(width), empty(width, e),
            empty(width, features), freq, hidden_weights, hidden_biases, empty(e, width), empty(e), m, 1.0,
            "uniform", 0.0, 1.0, "mean", True, True)
        fused_loss._fused_backward(empty(dt=torch.float32), hidden, None, empty(width, d), saved, e, 1.0, True, True)
    return plan


# Trip counts of each kernel's loops, from its launch: [(an opcode found in the loop's body, trips), ...],
# matched in address order; loops matched by none run once (library slow paths: usually skipped).
def _gemm_trips(k_name):
    return lambda a: [("HGMMA|HMMA|FFMA", math.ceil(a[k_name] / a["BLOCK_K"]))]


LOOP_TRIPS = {
    "flow_inputs_kernel": lambda a: [("IMAD.HI|MUFU", math.ceil(a["E"] / a["BLOCK_E"])),
                                     ("MUFU", math.ceil(a["F"] / a["BLOCK_F"]))],
    "linear_silu_kernel": _gemm_trips("K"),
    "linear_silu_backward_kernel": _gemm_trips("K"),
    "output_loss_kernel": _gemm_trips("K"),
    "weight_grad_kernel": _gemm_trips("rows_per_split"),
    "scatter_rows_kernel": lambda a: [],
}


# ---------------------------------------------------------------------------------------------
# 2. Instructions per program, from the SASS


@dataclass
class Instruction:
    addr: int
    text: str

    @property
    def opcode(self) -> str:
        parts = self.text.split()
        return parts[1] if parts[0].startswith("@") else parts[0]

    @property
    def predicated(self) -> bool:
        return self.text.startswith("@") and not self.text.startswith("@PT")

    @property
    def target(self) -> int | None:
        m = re.search(r"0x([0-9a-f]+)", self.text)
        return int(m.group(1), 16) if m else None


def disassemble(cubin: bytes) -> list[Instruction]:
    """The SASS of a single-kernel cubin (Triton's bundled ``cuobjdump``)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        sass = subprocess.run([tool, "-sass", handle.name], capture_output=True, text=True, check=True).stdout
    return [Instruction(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass, re.M)]


@dataclass
class PathCount:
    instructions: float  # warp-instructions one warp issues on the cheapest path
    tensor: float  # of which tensor-core instructions (HGMMA/HMMA)
    looped: float  # of which inside the counted loops (the GEMM main loop)


def cheapest_path(instructions: list[Instruction], trips: list[tuple[str, int]]) -> PathCount:
    """Fewest warp-instructions from entry to EXIT, loops weighted by ``trips`` (see the module doc).

    ``trips`` is matched in address order against the outermost loops whose body contains the opcode
    pattern; a ``CALL`` costs the instructions of its callee up to ``RET`` (e.g. a 64-bit division).
    """
    blocks, succ, sink = _control_flow(instructions)
    back_edges = _back_edges(len(blocks), succ)
    multiplicity = [1.0] * len(blocks)
    wanted, counted = list(trips), []
    for start, end in sorted((blocks[h][0], blocks[t][1]) for t, h in back_edges):
        if not wanted or any(s <= start < e for s, e in counted):
            continue  # nothing left to match, or nested in a counted loop (e.g. a slow path inside it)
        if re.search(wanted[0][0], " ".join(ins.opcode for ins in instructions[start:end])):
            count = wanted.pop(0)[1]
            counted.append((start, end))
            for b, (s, _) in enumerate(blocks):
                if start <= s < end:
                    multiplicity[b] *= count
            for b in list(succ):  # a program runs its counted loops: no path leaves before or jumps over one
                if blocks[b][0] < start:
                    kept = {c for c in succ[b] if c != sink and blocks[c][0] < end}
                    succ[b] = kept or succ[b]
    for t, h in back_edges:
        succ[t].discard(h)
    index_of = {ins.addr: i for i, ins in enumerate(instructions)}
    best = {sink: (0.0, 0.0, 0.0)}
    for b in reversed(range(len(blocks))):  # forward edges lead to later blocks; the others are dead ends here
        s, e = blocks[b]
        body = instructions[s:e]
        calls = sum(_callee_size(instructions, index_of, ins) for ins in body if ins.opcode.startswith("CALL"))
        options = [best[c] for c in succ[b] if c in best]
        if not options:
            best[b] = (math.inf, math.inf, math.inf)
            continue
        instr, tens, looped = min(options)
        own = (len(body) + calls) * multiplicity[b]
        own_tensor = sum(1 for ins in body if ins.opcode.startswith(("HGMMA", "HMMA"))) * multiplicity[b]
        best[b] = (instr + own, tens + own_tensor, looped + (own if multiplicity[b] > 1 else 0.0))
    return PathCount(*best[0])


def _control_flow(instructions: list[Instruction]):
    """Basic blocks ``[(start, end)]`` (instruction indices), successors, and the sink (after EXIT)."""
    def ends_block(ins):
        return ins.opcode.startswith(("BRA", "JMP", "EXIT", "RET"))

    index_of = {ins.addr: i for i, ins in enumerate(instructions)}
    starts = {0} | {i + 1 for i, ins in enumerate(instructions) if ends_block(ins)}
    starts |= {index_of[ins.target] for ins in instructions
               if ins.opcode.startswith(("BRA", "JMP")) and ins.target in index_of}
    starts = sorted(s for s in starts if s < len(instructions))
    blocks = [(s, starts[k + 1] if k + 1 < len(starts) else len(instructions)) for k, s in enumerate(starts)]
    block_at = {s: b for b, (s, _) in enumerate(blocks)}
    sink = len(blocks)
    succ = defaultdict(set)
    for b, (_, e) in enumerate(blocks):
        last = instructions[e - 1]
        if last.opcode.startswith(("BRA", "JMP")) and last.target in index_of:
            succ[b].add(block_at[index_of[last.target]])
        if last.opcode.startswith(("EXIT", "RET")):
            succ[b].add(sink)
        if e < len(instructions) and (not ends_block(last) or last.predicated):
            succ[b].add(b + 1)
    return blocks, succ, sink


def _callee_size(instructions, index_of, call: Instruction) -> int:
    """Instructions of a called subroutine, from its entry to its first ``RET``."""
    start = index_of.get(call.target)
    if start is None:
        return 0
    for i in range(start, len(instructions)):
        if instructions[i].opcode.startswith("RET"):
            return i - start + 1
    return 0


def _back_edges(count: int, succ) -> list[tuple[int, int]]:
    """Edges ``t -> h`` whose target dominates their source (natural loops), by the iterative algorithm."""
    preds = defaultdict(set)
    for b, targets in succ.items():
        for c in targets:
            preds[c].add(b)
    dom = [set(range(count)) for _ in range(count)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in range(1, count):
            incoming = [dom[p] for p in preds[b] if p < count]
            new = (set.intersection(*incoming) if incoming else set()) | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return [(t, h) for t, targets in succ.items() for h in targets if h < count and h in dom[t]]


# ---------------------------------------------------------------------------------------------
# 3. Time bounds


@dataclass
class KernelEstimate:
    """One launch of one kernel variant at the modelled shape (times in microseconds)."""

    name: str
    programs: int
    warps: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    per_sm: int  # programs resident per SM
    instructions: float  # warp-instructions per program, at least
    tensor_share: float  # tensor-core share of them
    issue_us: float  # all its instructions, on the busiest SM
    tensor_us: float  # all its tensor-core work, on the busiest SM
    memory_us: float  # its tensor arguments once, at the HBM bandwidth
    compute_us: float  # issue and tensor time combined as the occupancy allows (module doc)

    @property
    def bound_us(self) -> float:
        return max(self.compute_us, self.memory_us)


def programs_per_sm(device: Device, warps: int, registers: int, shared: int) -> int:
    """Resident programs per SM, limited by registers (allocated per warp in units of 256), shared memory
    (1 KiB reserved per program) and warps."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = device.registers // (per_warp * warps)
    by_shared = device.shared_bytes // (shared + 1024) if shared else 32
    return max(0, min(by_registers, by_shared, device.max_warps // warps, 32))


def _tensor_flops(instructions: list[Instruction], path: PathCount, warps: int, device: Device) -> tuple[float, int]:
    """(tensor-core FLOPs per program, FLOP/clock/SM of its instruction kind), from the SASS's HGMMA/HMMA shape."""
    for ins in instructions:
        m = re.match(r"(HGMMA|HMMA)\.(\d+)x(\d+)x(\d+)\.F32\.(\w+)", ins.opcode) or re.match(
            r"(HMMA)\.(16)(8)(\d+)\.F32\.?(\w*)", ins.opcode)
        if m:
            macs = int(m.group(2)) * int(m.group(3)) * int(m.group(4))
            kind = {"BF16": "bf16", "F16": "fp16", "TF32": "tf32"}.get(m.group(5).upper(), "bf16")
            per_issue = macs * (warps / 4 if m.group(1) == "HGMMA" else 1)  # HGMMA: 4 warps issue one warpgroup op
            return 2.0 * path.tensor * per_issue, device.tensor_flops_per_clock[kind]
    return 0.0, device.tensor_flops_per_clock["fp32"]


def estimate_launch(launch: Launch, instructions: list[Instruction], registers: int, spill: int, shared: int,
                    device: Device = Device()) -> KernelEstimate:
    """The time bound of one launch (see the module doc) from its kernel's SASS and ptxas numbers."""
    warps = launch.constexprs.get("num_warps", 4)
    trips = LOOP_TRIPS[launch.name]({**launch.args, **launch.constexprs})
    path = cheapest_path(instructions, trips)
    programs = math.prod(launch.grid)
    per_sm = max(programs_per_sm(device, warps, registers, shared), 1)
    on_busiest_sm = math.ceil(programs / device.sms)
    clock = device.clock_ghz * 1e3  # cycles per microsecond
    issue = warps * path.instructions / device.issue_per_clock  # cycles of one program, alone on an SM
    loop_issue = warps * path.looped / device.issue_per_clock
    flops, rate = _tensor_flops(instructions, path, warps, device)
    tensor = flops / rate
    if per_sm >= 2:  # programs sharing an SM overlap one's tensor work with another's instructions
        cycles = on_busiest_sm * max(issue, tensor)
    else:  # alone on its SM, a program's epilogue (after the main loop) overlaps nothing
        cycles = on_busiest_sm * (max(loop_issue, tensor) + issue - loop_issue)
    seen, nbytes = set(), 0
    for value in launch.args.values():
        if isinstance(value, tuple) and value[2] not in seen:  # distinct tensors (in-place outputs count once)
            seen.add(value[2])
            nbytes += math.prod(value[0]) * value[1].itemsize
    return KernelEstimate(
        launch.name, programs, warps, registers, spill, shared, per_sm, warps * path.instructions,
        path.tensor / path.instructions if path.instructions else 0.0,
        on_busiest_sm * issue / clock, on_busiest_sm * tensor / clock, nbytes / (device.hbm_tb_s * 1e6),
        cycles / clock)


def render_estimate(estimates: list[KernelEstimate], plan: Plan, device: Device = Device()) -> str:
    """The model's table (Markdown) and its total against the op's roofline."""
    lines = [
        f"**ESTIMATE** (static model from the sm_90a SASS; `python -m sfr_kernels.compile_check --model`; "
        f"not a measurement): {device.name}, {device.sms} SMs at {device.clock_ghz} GHz, "
        f"{device.hbm_tb_s} TB/s, cuBLAS charged at {device.cublas_tflops:.0f} TFLOP/s.",
        "",
        "| kernel | programs | warps | regs | spill B | smem KiB | per SM | warp-instr / program | tensor share "
        "| issue µs | tensor µs | memory µs | bound µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in estimates:
        lines.append(f"| {k.name} | {k.programs:,} | {k.warps} | {k.registers} | {k.spill_bytes} "
                     f"| {k.shared_bytes / 1024:.0f} | {k.per_sm} | {k.instructions:,.0f} | {k.tensor_share:.1%} "
                     f"| {k.issue_us:.1f} | {k.tensor_us:.1f} | {k.memory_us:.1f} | **{k.bound_us:.1f}** |")
    triton_us = sum(k.bound_us for k in estimates)
    cublas_flops = sum(f for _, f in plan.gemm_flops)
    cublas_us = cublas_flops / (device.cublas_tflops * 1e6)
    other_us = sum(b for _, b in plan.other_bytes) / (device.hbm_tb_s * 1e6)
    total = triton_us + cublas_us + other_us
    lines += [
        "",
        "| part | estimate µs |",
        "|---|---:|",
        f"| Triton kernels ({len(estimates)} launches) | {triton_us:,.1f} |",
        f"| cuBLAS GEMMs ({len(plan.gemm_flops)}: {cublas_flops / 1e9:,.0f} GFLOP at {device.cublas_tflops:.0f} "
        f"TFLOP/s) | {cublas_us:,.1f} |",
        f"| other torch operations ({len(plan.other_bytes)}, {sum(b for _, b in plan.other_bytes) / 2**20:,.0f} MiB "
        f"at {device.hbm_tb_s} TB/s) | {other_us:,.1f} |",
        f"| **total, one forward + backward** | **{total:,.1f}** |",
    ]
    return "\n".join(lines) + "\n"
