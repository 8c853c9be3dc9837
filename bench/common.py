"""Shared pieces of the benchmarks: shape presets, FLOP/byte counts, roofline math, timers, CSV.

Results rows (``bench/results/*.csv``) have exactly the columns :data:`CSV_COLUMNS`::

    kernel,provider,mode,metric,unit,N,M,D,E,width,depth,dtype,p50,p20,p80,device,torch,triton,commit,timestamp

``p50/p20/p80`` are the median and the 20 %/80 % quantiles of the metric's distribution over the
timed repetitions. For throughput-like metrics derived from a time (TFLOP/s, % of roofline) the
quantiles are mapped so that ``p20 <= p50 <= p80`` still holds: ``p20 = f(t_p80)``, ``p80 = f(t_p20)``.

FLOPs of the SFR op (all GEMMs; ``F`` = time features, ``Hd`` = head width, ``L = depth - 1`` hidden
layers; a multiply-add counts 2)::

    forward   = 2·N·D·Hd                     c = W_c h (once per anchor, shared by the M samples)
              + 2·N·M·(E + F)·Hd             z = W_x x_s + W_t e_s
              + 2·N·M·Hd²·L                  hidden layers
              + 2·N·M·Hd·E                   v = W_o a
    backward  = forward                      every weight gradient (one GEMM per forward GEMM)
              + 2·N·M·Hd·E + 2·N·M·Hd²·L     input gradients of the output and hidden layers
              + 2·N·D·Hd                     ∂h = ∂c W_c, only when grad_scale > 0
    full      = forward + backward           (≈ 3× forward)

(No input gradient flows into ``x_s`` or ``e_s``: they are functions of the random draws.)

Minimum bytes (``b`` = bytes per element of the benchmark dtype, ``P`` = head parameter count)::

    forward   = b·(N·D + N·E + P)            read the anchor states, the targets and the weights
    backward  = forward + b·(N·D + P)        ... and write ∂hidden (if grad_scale > 0) and ∂weights
    full      = backward

Roofline: ``t_roof = max(flops / gemm_rate, bytes / bandwidth)`` with the device's GEMM rate and copy
bandwidth measured in the same run (:func:`measure_gemm_tflops`, :func:`measure_copy_bandwidth`);
``roofline_pct = t_roof / t_measured · 100``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from sfr_kernels.validation import LossShape  # the one shape type of the op (bench rows, work, memory)

CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "N", "M", "D", "E", "width", "depth", "dtype",
               "p50", "p20", "p80", "device", "torch", "triton", "commit", "timestamp")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
MODES = ("forward", "backward", "full")
QUANTILES = (0.5, 0.2, 0.8)
MIN_REPS = 10  # timed runs per measurement on CUDA, at least

# Final hidden size D of the backbones and output size E of the sentence encoders (docs/design.md, "Measuring performance").
MODELS = {"qwen2.5-0.5b": 896, "qwen2.5-1.5b": 1536, "qwen2.5-7b": 3584, "qwen3-32b": 5120}
ENCODERS = {"minilm": 384, "mpnet": 768, "bge-large": 1024}
PRESETS = {f"{model}+{encoder}": (d, e) for model, d in MODELS.items() for encoder, e in ENCODERS.items()}
HEADLINE_PRESET = "qwen2.5-7b+mpnet"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def preset_dims(name: str) -> tuple[int, int]:
    """``(D, E)`` of a preset such as ``qwen2.5-7b+mpnet``."""
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)} (or 'all'), got {name!r}")
    return PRESETS[name]


def preset_name(d: int, e: int) -> str:
    """The preset of ``(D, E)``, or ``D{d}+E{e}`` for a shape outside the table."""
    for name, dims in PRESETS.items():
        if dims == (d, e):
            return name
    return f"D{d}+E{e}"


def loss_flops(shape: LossShape, mode: str, grad_hidden: bool = True) -> float:
    """GEMM FLOPs of the SFR op in ``mode`` (``forward`` | ``backward`` | ``full``); formulas in the module doc."""
    n, m, d, e, hd, f, layers = shape.N, shape.M, shape.D, shape.E, shape.width, shape.time_features, shape.depth - 1
    cond = 2.0 * n * d * hd
    forward = cond + 2.0 * n * m * (e + f) * hd + 2.0 * n * m * hd * hd * layers + 2.0 * n * m * hd * e
    backward = forward + 2.0 * n * m * hd * e + 2.0 * n * m * hd * hd * layers + (cond if grad_hidden else 0.0)
    return {"forward": forward, "backward": backward, "full": forward + backward}[_check_mode(mode)]


def loss_min_bytes(shape: LossShape, mode: str, bytes_per_element: int, grad_hidden: bool = True) -> float:
    """Minimum bytes moved by the SFR op in ``mode``; formulas in the module doc."""
    params = shape.head_params()
    forward = bytes_per_element * (shape.N * shape.D + shape.N * shape.E + params)
    if _check_mode(mode) == "forward":
        return float(forward)
    return float(forward + bytes_per_element * ((shape.N * shape.D if grad_hidden else 0) + params))


def roofline_ms(flops: float, nbytes: float, gemm_tflops: float, bandwidth_gbs: float) -> float:
    """``max(flops / gemm_rate, bytes / bandwidth)`` in milliseconds (rates in TFLOP/s and GB/s)."""
    if gemm_tflops <= 0 or bandwidth_gbs <= 0:
        raise ValueError(f"device rates must be positive, got {gemm_tflops} TFLOP/s and {bandwidth_gbs} GB/s")
    return max(flops / (gemm_tflops * 1e12), nbytes / (bandwidth_gbs * 1e9)) * 1e3


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    """GPU name (``NVIDIA H100 80GB HBM3``) or ``cpu: <processor model>``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model} x{os.cpu_count()}"


def git_commit() -> str:
    """``$BENCH_COMMIT`` if set (a copy of the checkout without ``.git``), else ``git rev-parse --short HEAD``
    with ``+dirty`` when tracked files differ from it; ``unknown`` outside a git repository."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def environment(device: torch.device) -> dict[str, str]:
    """The per-row environment columns: device, torch, triton, commit, timestamp (UTC, ISO 8601)."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def is_cpu_device(name: str) -> bool:
    """Whether a ``device`` column names a CPU (such rows are harness checks, never kernel results)."""
    return name.strip().lower().startswith("cpu")


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[..., object], device: torch.device, *, warmup: int, rep: int,
             grad_to_none: Sequence[torch.Tensor] = (), setup: Callable[[], object] | None = None
             ) -> tuple[float, float, float]:
    """``(p50, p20, p80)`` of ``fn``'s run time in milliseconds.

    ``fn()`` is timed; with ``setup``, ``fn(setup())`` is timed and ``setup`` runs untimed before every
    call (e.g. the forward that builds the graph a timed backward consumes). The ``.grad`` of
    ``grad_to_none`` is set to None before every timed call, untimed (fresh gradients, no accumulation).

    CUDA: one untimed call first (kernel compilation, autotuning, allocator warm-up: never part of
    any number), then one call timed to size the window so that at least :data:`MIN_REPS` runs are
    timed; then ``triton.testing.do_bench`` (``warmup``/``rep`` in milliseconds; CUDA events; L2
    flushed before every run). With ``setup``, which ``do_bench`` cannot interleave, the same protocol
    is run by hand: warm-up calls, then for each run ``setup()``, clear grads, flush L2, events around
    ``fn``. CPU: ``warmup`` untimed calls, then ``rep`` calls timed with ``perf_counter`` -- only a
    check that the harness runs, never a kernel result.
    """
    prepare = setup or (lambda: None)
    timed = fn if setup is not None else (lambda _: fn())

    def call():
        arg = prepare()
        _clear_grads(grad_to_none)
        timed(arg)

    if device.type != "cuda":
        for _ in range(warmup):
            call()
        times = []
        for _ in range(max(rep, 1)):
            arg = prepare()
            _clear_grads(grad_to_none)
            start = time.perf_counter()
            timed(arg)
            times.append((time.perf_counter() - start) * 1e3)
        return _quantiles(times)

    call()  # compilation / autotuning / allocator warm-up: excluded from everything below
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    once_ms = (time.perf_counter() - start) * 1e3  # an upper bound: includes setup and launch latency
    warmup_ms, rep_ms = max(warmup, 2 * once_ms), max(rep, MIN_REPS * once_ms)
    if setup is None:
        from triton.testing import do_bench

        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                     quantiles=list(QUANTILES))
        return float(q[0]), float(q[1]), float(q[2])
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # > L2 (50 MB H100, 60 MB H200)
    for _ in range(max(1, round(warmup_ms / once_ms))):
        call()
    events = []
    for _ in range(max(MIN_REPS, round(rep_ms / once_ms))):
        arg = prepare()
        _clear_grads(grad_to_none)
        flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        timed(arg)
        end.record()
        events.append((begin, end))
    synchronize(device)
    return _quantiles([begin.elapsed_time(end) for begin, end in events])


def _quantiles(times_ms: Sequence[float]) -> tuple[float, float, float]:
    """``(p50, p20, p80)`` of a list of times."""
    q = torch.quantile(torch.tensor(times_ms, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def peak_memory_mb(run: Callable[[], object], device: torch.device) -> float:
    """MB of CUDA memory ``run`` adds at its peak beyond what is allocated before it (inputs, weights).

    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation at
    the start. Anything ``run`` returns stays alive until the peak is read (e.g. a forward's graph).
    """
    if device.type != "cuda":
        raise ValueError("peak_memory_mb needs a CUDA device (CPU memory is not measured)")
    gc.collect()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    kept = run()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del kept
    return (peak - base) / 2**20


def measure_gemm_tflops(device: torch.device, dtype: torch.dtype, size: int, *, warmup: int, rep: int
                        ) -> tuple[float, float, float]:
    """Dense GEMM rate ``2·size³ / t`` of a ``size×size @ size×size`` matmul: (p50, p20, p80) TFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    t50, t20, t80 = bench_ms(lambda: torch.matmul(a, b, out=out), device, warmup=warmup, rep=rep)
    flops = 2.0 * size**3
    return tuple(flops / (t * 1e-3) / 1e12 for t in (t50, t80, t20))


def measure_copy_bandwidth(device: torch.device, nbytes: int, *, warmup: int, rep: int
                           ) -> tuple[float, float, float]:
    """Copy bandwidth ``2·nbytes / t`` (read + write) of ``dst.copy_(src)``: (p50, p20, p80) GB/s."""
    src = torch.randn(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t50, t20, t80 = bench_ms(lambda: dst.copy_(src), device, warmup=warmup, rep=rep)
    moved = 2.0 * src.numel() * 4
    return tuple(moved / (t * 1e-3) / 1e9 for t in (t50, t80, t20))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def cli(prog: str, doc: str, add_arguments, settings_from_args, run, argv=None) -> int:
    """The ``main`` of ``python -m bench.loss`` / ``bench.step``: parse, build the settings (a ``ValueError``
    is a one-line error, status 2), run them into ``--out``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run(settings, args.out)
    return 0


def show(table: str, out: Path | None) -> None:
    """Print a Markdown report, and write it to ``out`` too when given (``bench.work``, ``bench.memory``)."""
    print(table)
    if out is not None:
        Path(out).write_text(table)


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------

def make_row(env: dict[str, str], **fields) -> dict[str, str]:
    """A results row: the given fields plus the environment; missing columns are left empty."""
    unknown = set(fields) - set(CSV_COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns {sorted(unknown)}; expected a subset of {CSV_COLUMNS}")
    row = {column: "" for column in CSV_COLUMNS}
    row.update(env)
    for key, value in fields.items():
        row[key] = f"{value:.6g}" if isinstance(value, float) else ("" if value is None else str(value))
    return row


def append_rows(path: Path, rows: Sequence[dict[str, str]]) -> Path:
    """Append ``rows`` to the CSV at ``path`` (header written when new), atomically (temp file + rename).

    An existing file must have exactly :data:`CSV_COLUMNS` as its header.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_rows(path) if path.exists() else []
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(existing)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a results CSV; ``ValueError`` when its header is not :data:`CSV_COLUMNS`."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: header must be {','.join(CSV_COLUMNS)}, got {reader.fieldnames}")
        return list(reader)
