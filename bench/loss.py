"""Microbenchmark of the SFR loss: torch-eager vs torch-compile vs the fused Triton path.

Run from the repository root::

    python -m bench.loss                                   # headline preset, N in {4096,16384,65536}, M in {1,4}
    python -m bench.loss --preset all --N 16384 --M 4      # every model/encoder preset at one N, M
    python -m bench.loss --quick --out "$TMPDIR/r"           # small smoke run (CI runs this on the CPU)

Providers (``bench.providers``; same head weights, same inputs; the seed is a 0-dim device tensor,
so no provider pays a host-to-device copy):

* ``torch-eager``        -- what a user would write: the reference math with native torch draws
  (``torch.randn``/``torch.rand``).
* ``torch-compile``      -- ``torch.compile`` of that function, its draws included
  (``mode="max-autotune-no-cudagraphs"`` on CUDA, falling back to the default mode; the mode used is
  recorded in the provider column as ``torch-compile:<mode>``). Forward and backward are compiled
  before any timing; the compile time is written as its own row (``metric=compile_time``, s).
* ``torch-eager-philox`` -- the bit-compatible reference (the kernels' draws emulated in int64 by
  ``sfr_kernels.philox``): for information; every provider's first loss is printed next to its loss.
* ``triton``             -- ``sfr_loss(..., backend="triton")``. Skipped on the CPU: the Triton
  interpreter's timings say nothing about the kernels.

Modes: ``full`` (forward + backward), ``forward`` (a training forward: inputs require grad, the
graph is kept) and ``backward`` (``loss.backward()`` of a graph built untimed just before each timed
run). The fused path computes part of the gradient in its forward (gradient-in-forward), so its
forward is not comparable to the eager forward alone: compare ``full``.

Metrics: ``time`` (ms; median and 20/80 % quantiles; ``triton.testing.do_bench`` on CUDA after an
untimed first call, a simple timer loop on the CPU; see ``bench.common.bench_ms``), ``memory`` (MB the
op adds at its peak beyond its inputs: CUDA only), ``tflops`` (GEMM FLOPs / time, see
``bench.common``) and ``roofline_pct`` (roofline time / measured time · 100; the GEMM rate (bf16
``8192³`` matmul) and copy bandwidth are measured in the same run and written as ``kernel=device``
rows). Inputs are random (never zeros), rotated over several pre-allocated sets; the head's
zero-initialised output layer is re-initialised randomly so that every gradient is non-trivial.
Hidden states are passed as ``[N, D]`` (already gathered, no ``anchor_index``). Rows are appended to
the CSV after every measurement, so a run stopped early keeps what it measured; ``--budget-minutes``
starts no new provider once that much time has passed.

On the CPU everything runs in fp32 and only checks the harness: CPU numbers are never kernel results.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import common
from bench.common import LossShape
from bench.providers import (
    GPU_COMPILE_MODE,
    PROVIDERS,
    InputSet,
    make_head,
    make_inputs,
    make_loss_fn,
)

RUN_ORDER = ("triton", "torch-eager", "torch-compile", "torch-eager-philox")  # the slow, uncertain compile late
MODE_ORDER = ("full", "forward", "backward")  # the headline mode first
METRICS = ("time", "memory", "tflops", "roofline_pct", "compile_time")
ROTATING_SETS = 3  # pre-allocated input sets cycled through, so no run reuses the previous one's inputs


@dataclass
class Settings:
    """What one run measures (from the command line, with ``--quick`` defaults filled in)."""

    device: torch.device
    dtype: torch.dtype
    presets: list[str]
    n_values: list[int]
    m_values: list[int]
    providers: list[str]
    modes: list[str]
    metrics: list[str]
    warmup: int  # CUDA: milliseconds (do_bench); CPU: calls
    rep: int
    gemm_size: int
    copy_bytes: int
    compile_mode: str
    budget_s: float = math.inf  # no new provider starts after this many seconds
    compile_left_out: bool = False  # --quick on the CPU leaves torch-compile out unless asked for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", action="append", default=None, metavar="MODEL+ENCODER",
                        help=f"shape preset (repeatable), one of {', '.join(common.PRESETS)} or 'all' "
                             f"(default: {common.HEADLINE_PRESET})")
    parser.add_argument("--N", type=int, nargs="+", default=None, help="anchor counts (default: 4096 16384 65536)")
    parser.add_argument("--M", type=int, nargs="+", default=None, help="samples per anchor (default: 1 4)")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default=None,
                        help="input/head dtype (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None,
                        help="providers to run (default: all; --quick on the CPU: torch-eager only)")
    parser.add_argument("--modes", nargs="+", choices=common.MODES, default=None,
                        help="modes, run in the order full, forward, backward (default: all; --quick: full forward)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                        help="metrics (default: all; memory is measured on CUDA only)")
    parser.add_argument("--compile-mode", default=None,
                        help=f"torch.compile mode (default: {GPU_COMPILE_MODE} on CUDA, 'default' on the CPU)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="start no new provider after this many minutes (the rest is skipped and reported)")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS_DIR,
                        help="directory whose loss.csv the rows are appended to (default: bench/results)")
    parser.add_argument("--quick", action="store_true",
                        help="small smoke run: one preset, one small N, M=1, modes full+forward, few repetitions")


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    quick = args.quick
    if args.preset is None:
        presets = ["qwen2.5-0.5b+minilm" if quick and not on_gpu else common.HEADLINE_PRESET]
    elif "all" in args.preset:
        presets = list(common.PRESETS)
    else:
        presets = list(dict.fromkeys(args.preset))
    for name in presets:
        common.preset_dims(name)
    n_values = args.N or ([4096] if quick and on_gpu else [256] if quick else [4096, 16384, 65536])
    m_values = args.M or ([1] if quick else [1, 4])
    for flag, values in (("--N", n_values), ("--M", m_values)):
        if any(v < 1 for v in values):
            raise ValueError(f"{flag} values must be >= 1, got {values}")
    if args.providers is not None:
        chosen = set(args.providers)
    elif quick and not on_gpu:
        # Inductor's C++ build of the compiled reference takes about a minute on a small CPU.
        chosen = {"torch-eager", "torch-eager-philox", "triton"}
    else:
        chosen = set(PROVIDERS)
    providers = [p for p in RUN_ORDER if p in chosen]
    chosen_modes = set(args.modes or (["full", "forward"] if quick else common.MODES))
    modes = [m for m in MODE_ORDER if m in chosen_modes]
    metrics = args.metrics or list(METRICS)
    if on_gpu:
        warmup, rep = (5, 20) if quick else (25, 100)
        gemm_size, copy_bytes = (4096, 2**28) if quick else (8192, 2**30)
    else:
        warmup, rep = (1, 3) if quick else (2, 10)
        gemm_size, copy_bytes = (256, 2**24) if quick else (1024, 2**26)
    dtype = common.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    compile_mode = args.compile_mode or (GPU_COMPILE_MODE if on_gpu else "default")
    budget_s = math.inf if args.budget_minutes is None else 60.0 * args.budget_minutes
    return Settings(device, dtype, presets, n_values, m_values, providers, modes, metrics, warmup, rep,
                    gemm_size, copy_bytes, compile_mode, budget_s,
                    compile_left_out=args.providers is None and quick and not on_gpu)


def time_mode(loss_fn, inputs: list[InputSet], head, mode: str, settings: Settings):
    """(p50, p20, p80) ms of one mode, cycling over the input sets; fresh gradients for every run."""
    grads = [inp.hidden for inp in inputs] + list(head.parameters())
    rotation = itertools.cycle(inputs)
    kwargs = dict(warmup=settings.warmup, rep=settings.rep, grad_to_none=grads)
    try:
        if mode == "forward":
            return common.bench_ms(lambda: loss_fn(next(rotation)), settings.device, **kwargs)
        if mode == "full":
            return common.bench_ms(lambda: loss_fn(next(rotation)).backward(), settings.device, **kwargs)
        return common.bench_ms(lambda loss: loss.backward(), settings.device,
                               setup=lambda: loss_fn(next(rotation)), **kwargs)
    finally:
        for t in grads:
            t.grad = None


def memory_mode(loss_fn, inp: InputSet, head, mode: str, device: torch.device) -> float:
    """MB the op adds at its peak beyond its inputs (and, for ``backward``, beyond the built graph)."""
    params = list(head.parameters())

    def clear():
        inp.hidden.grad = None
        for p in params:
            p.grad = None

    clear()
    if mode == "forward":
        mb = common.peak_memory_mb(lambda: loss_fn(inp), device)
    elif mode == "full":
        mb = common.peak_memory_mb(lambda: loss_fn(inp).backward(), device)
    else:
        loss = loss_fn(inp)
        mb = common.peak_memory_mb(lambda: loss.backward(), device)
        del loss
    clear()
    return mb


def measure_device(settings: Settings, env: dict) -> tuple[float, float, list[dict]]:
    """GEMM rate (TFLOP/s) and copy bandwidth (GB/s) of this device, and their CSV rows."""
    dtype_name = common.DTYPE_NAMES[settings.dtype]
    gemm = common.measure_gemm_tflops(settings.device, settings.dtype, settings.gemm_size,
                                      warmup=settings.warmup, rep=settings.rep)
    copy = common.measure_copy_bandwidth(settings.device, settings.copy_bytes, warmup=settings.warmup,
                                         rep=settings.rep)
    label = "" if settings.device.type == "cuda" else " (CPU, harness check only)"
    print(f"device: {env['device']}{label}")
    print(f"  {dtype_name} GEMM {settings.gemm_size}^3: {gemm[0]:.3f} TFLOP/s; copy {settings.copy_bytes / 2**20:.0f} MiB: "
          f"{copy[0]:.1f} GB/s", flush=True)
    rows = [
        common.make_row(env, kernel="device", provider="torch", mode="gemm", metric="tflops", unit="TFLOP/s",
                        N=settings.gemm_size, dtype=dtype_name, p50=gemm[0], p20=gemm[1], p80=gemm[2]),
        common.make_row(env, kernel="device", provider="torch", mode="copy", metric="bandwidth", unit="GB/s",
                        N=settings.copy_bytes, dtype="fp32", p50=copy[0], p20=copy[1], p80=copy[2]),
    ]
    return gemm[0], copy[0], rows


def run(settings: Settings, out_dir: Path) -> list[dict]:
    """Measure everything ``settings`` asks for, appending rows to ``out_dir/loss.csv`` as they come; return them."""
    started = time.monotonic()
    path = Path(out_dir) / "loss.csv"
    env = common.environment(settings.device)
    on_gpu = settings.device.type == "cuda"
    if not on_gpu:
        print("NOTE: no CUDA device -- CPU run in fp32: a check of the harness, NOT kernel results.")
        if "memory" in settings.metrics:
            print("NOTE: memory is not measured on the CPU (no memory rows are written).")
    providers = list(settings.providers)
    if "triton" in providers and not on_gpu:
        print("NOTE: provider triton skipped on the CPU: Triton-interpreter timings are meaningless.")
        providers.remove("triton")
    if settings.compile_left_out:
        print("NOTE: torch-compile not run (--quick on the CPU: inductor's C++ build takes about a minute); "
              "pass --providers torch-compile to include it.")
    gemm_tflops, bandwidth_gbs, rows = measure_device(settings, env)
    common.append_rows(path, rows)
    dtype_name = common.DTYPE_NAMES[settings.dtype]
    bytes_per_element = torch.finfo(settings.dtype).bits // 8

    for preset in settings.presets:
        d, e = common.preset_dims(preset)
        for n in settings.n_values:
            for m in settings.m_values:
                shape = LossShape(N=n, M=m, D=d, E=e)
                print(f"\n{preset} N={n} M={m} (D={d}, E={e}, width={shape.width}, depth={shape.depth}, {dtype_name})",
                      flush=True)
                torch.manual_seed(0)
                head = make_head(shape, settings.device, settings.dtype)
                inputs = make_inputs(shape, settings.device, settings.dtype, ROTATING_SETS)
                reference = make_loss_fn("torch-eager-philox", head, shape, inputs[0], settings.compile_mode)
                reference_loss = reference.fn(inputs[0]).item()  # every provider's first loss is shown beside it
                for provider in providers:
                    if time.monotonic() - started > settings.budget_s:
                        print(f"  {provider}: skipped (the --budget-minutes budget is used up)", flush=True)
                        continue
                    new = measure_provider(provider, head, inputs, shape, settings, env, gemm_tflops, bandwidth_gbs,
                                           bytes_per_element, reference_loss)
                    common.append_rows(path, new)
                    rows += new
                del head, inputs
                if on_gpu:
                    torch.cuda.empty_cache()
    print(f"\nwrote {len(rows)} rows to {path}")
    return rows


def measure_provider(provider: str, head, inputs: list[InputSet], shape: LossShape, settings: Settings, env: dict,
                     gemm_tflops: float, bandwidth_gbs: float, bytes_per_element: int, reference_loss: float
                     ) -> list[dict]:
    """Every mode of one provider on one shape (a provider that fails to build or runs out of memory is reported).

    First the provider's loss on the first input set is printed next to the bit-compatible reference's
    (``reference_loss``, the same draws as ``triton``): a fused path that computes something else shows
    at once; the native-RNG providers draw other random numbers, so theirs agree only statistically.
    """
    try:
        loss_fn = make_loss_fn(provider, head, shape, inputs[0], settings.compile_mode)
    except Exception as error:  # noqa: BLE001 - report, go on with the others
        print(f"  {provider}: skipped ({type(error).__name__}: {error})", flush=True)
        return []
    loss = loss_fn.fn(inputs[0]).item()  # with grad enabled, as timed: no recompilation for no_grad
    same_draws = provider in ("triton", "torch-eager-philox")
    print(f"  {loss_fn.label}: loss {loss:.6g}, Philox reference {reference_loss:.6g} "
          f"(relative difference {abs(loss - reference_loss) / max(abs(reference_loss), 1e-30):.1e}"
          f"{'' if same_draws else ', other draws'})", flush=True)
    rows = []
    if loss_fn.compile_s and "compile_time" in settings.metrics:
        rows.append(common.make_row(env, kernel="sfr_loss", provider=loss_fn.label, mode="full", metric="compile_time",
                                    unit="s", N=shape.N, M=shape.M, D=shape.D, E=shape.E, width=shape.width,
                                    depth=shape.depth, dtype=common.DTYPE_NAMES[settings.dtype], p50=loss_fn.compile_s,
                                    p20=loss_fn.compile_s, p80=loss_fn.compile_s))
    for mode in settings.modes:
        try:
            rows += measure_one(loss_fn.fn, loss_fn.label, inputs, head, shape, mode, settings, env, gemm_tflops, bandwidth_gbs,
                                bytes_per_element)
        except torch.cuda.OutOfMemoryError as error:
            print(f"  {loss_fn.label:<36} {mode:<8} out of memory ({str(error).splitlines()[0]})", flush=True)
        finally:
            for t in [inp.hidden for inp in inputs] + list(head.parameters()):
                t.grad = None
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def measure_one(loss_fn, label, inputs, head, shape: LossShape, mode: str, settings: Settings, env: dict,
                gemm_tflops: float, bandwidth_gbs: float, bytes_per_element: int) -> list[dict]:
    """The rows (time, memory, tflops, roofline_pct) of one provider in one mode."""
    base = dict(kernel="sfr_loss", provider=label, mode=mode, N=shape.N, M=shape.M, D=shape.D, E=shape.E,
                width=shape.width, depth=shape.depth, dtype=common.DTYPE_NAMES[settings.dtype])
    t50, t20, t80 = time_mode(loss_fn, inputs, head, mode, settings)
    flops = common.loss_flops(shape, mode)
    roof = common.roofline_ms(flops, common.loss_min_bytes(shape, mode, bytes_per_element), gemm_tflops, bandwidth_gbs)
    rows, summary = [], f"  {label:<36} {mode:<8} {t50:10.3f} ms [{t20:.3f}, {t80:.3f}]"
    if "time" in settings.metrics:
        rows.append(common.make_row(env, metric="time", unit="ms", p50=t50, p20=t20, p80=t80, **base))
    if "tflops" in settings.metrics:
        tf = [flops / (t * 1e-3) / 1e12 for t in (t50, t80, t20)]
        rows.append(common.make_row(env, metric="tflops", unit="TFLOP/s", p50=tf[0], p20=tf[1], p80=tf[2], **base))
        summary += f" {tf[0]:8.3f} TFLOP/s"
    if "roofline_pct" in settings.metrics:
        pct = [roof / t * 100 for t in (t50, t80, t20)]
        rows.append(common.make_row(env, metric="roofline_pct", unit="%", p50=pct[0], p20=pct[1], p80=pct[2], **base))
        summary += f" {pct[0]:6.1f}% roofline"
    if "memory" in settings.metrics and settings.device.type == "cuda":
        mb = memory_mode(loss_fn, inputs[0], head, mode, settings.device)
        rows.append(common.make_row(env, metric="memory", unit="MB", p50=mb, p20=mb, p80=mb, **base))
        summary += f" {mb:9.1f} MB"
    print(summary, flush=True)
    if not all(math.isfinite(t) for t in (t50, t20, t80)):
        raise RuntimeError(f"non-finite timing for {label} {mode}")
    return rows


if __name__ == "__main__":
    sys.exit(common.cli("python -m bench.loss", __doc__, add_arguments, settings_from_args, run))
