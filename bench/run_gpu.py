"""Every GPU number of bench/RESULTS.md from one short command, in order of value (``bash bench/run_gpu.sh``).

A lent GPU gives a session 15 minutes in all, machine start included, so the default run must end
within **7 minutes** on a bare H100/H200 image (torch 2.11, Triton 3.6, transformers 5.17, no
flash-attn/Liger/MiniLM, no internet)::

    bash bench/run_gpu.sh                       # the default stages, 7-minute budget, rows into $OUT or bench/results
    bash bench/run_gpu.sh headline step         # only these stages, in this order
    python -m bench.run_gpu --list              # the stages, their limits and what they run

The stages run one after another, each as its own process with its own time limit, under one global
deadline (``--budget-minutes``, default 7): a stage is not started when less time is left than it needs
at least, and a running stage is killed (its whole process group) at its limit or at the deadline.
Each stage writes its rows to ``OUT`` as soon as it measures them (``bench.loss``/``bench.step`` append
a CSV row per measurement, ``check_gpu.py`` rewrites its summary after every check), and this script
rewrites ``OUT/run_gpu.md`` -- what ran, for how long, with what result -- after every stage, so a
command stopped by the session's limit keeps everything measured until then. Exit status 0 when every
stage that ran succeeded.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_MINUTES = 7.0
HEADLINE = ["--preset", "qwen2.5-7b+mpnet", "--N", "16384", "--M", "4"]


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    args: tuple  # the command after the interpreter; "{out}" is replaced by the output directory
    timeout_s: int  # the stage's own limit
    min_s: int  # not started with less than this left before the deadline
    default: bool = True  # part of the default run (in table order: the extras last)


STAGES = (
    Stage("check", "GPU correctness essentials: fp32 + bf16 accuracy of the main cases, determinism, CUDA-graph "
                   "replay with an advancing device seed -> check_gpu.md",
          ("bench/check_gpu.py", "--quick", "--only", "accuracy", "determinism", "cuda-graph", "--budget-minutes",
           "2.2", "--out", "{out}/check_gpu.md"), 150, 60),
    Stage("headline", "qwen2.5-7b+mpnet N=16384 M=4 bf16, mode full: triton, torch-eager, torch-compile (default "
                      "mode; compile time as its own row) -> loss.csv",
          ("-m", "bench.loss", *HEADLINE, "--modes", "full", "--providers", "triton", "torch-eager", "torch-compile",
           "--compile-mode", "default", "--out", "{out}"), 180, 60),
    Stage("step", "end-to-end SFT vs SFT+SFR optimizer step, qwen2.5-1.5b shape, bf16 -> step.csv",
          ("-m", "bench.step", "--model-config", "qwen2.5-1.5b", "--out", "{out}"), 100, 40),
    Stage("modes", "extra: the headline's forward and backward modes, and the torch-eager-philox provider",
          ("-m", "bench.loss", *HEADLINE, "--modes", "forward", "backward", "full", "--providers", "triton",
           "torch-eager", "torch-eager-philox", "--out", "{out}"), 120, 30),
    Stage("check-rest", "extra: every accuracy case and fp16, autocast, no-host-sync, torch.compile -> check_rest.md",
          ("bench/check_gpu.py", "--only", "accuracy", "autocast", "no-host-sync", "compile", "--budget-minutes", "2.5",
           "--out", "{out}/check_rest.md"), 170, 60),
    Stage("compile-autotune", "torch-compile max-autotune-no-cudagraphs at the headline (long compile)",
          ("-m", "bench.loss", *HEADLINE, "--modes", "full", "--providers", "torch-compile", "--compile-mode",
           "max-autotune-no-cudagraphs", "--out", "{out}"), 400, 200, default=False),
    Stage("memcheck", "compute-sanitizer memcheck of a small subset -> memcheck.md",
          ("bench/check_gpu.py", "--only", "memcheck", "--out", "{out}/memcheck.md"), 420, 120, default=False),
    Stage("large-offsets", "N*M*E > 2**31 against the reference -> large_offsets.md",
          ("bench/check_gpu.py", "--only", "large-offsets", "--out", "{out}/large_offsets.md"), 200, 60,
          default=False),
    Stage("nsweep", "qwen2.5-7b+mpnet, N in {4096, 65536} x M in {1, 4}, mode full",
          ("-m", "bench.loss", "--preset", "qwen2.5-7b+mpnet", "--N", "4096", "65536", "--M", "1", "4", "--modes",
           "full", "--compile-mode", "default", "--budget-minutes", "5", "--out", "{out}"), 420, 120, default=False),
    Stage("sweep", "the other model/encoder presets at N=16384, M=4, mode full",
          ("-m", "bench.loss", "--preset", "qwen2.5-0.5b+mpnet", "--preset", "qwen2.5-1.5b+mpnet", "--preset",
           "qwen3-32b+mpnet", "--preset", "qwen2.5-7b+minilm", "--preset", "qwen2.5-7b+bge-large", "--N", "16384",
           "--M", "4", "--modes", "full", "--compile-mode", "default", "--budget-minutes", "5", "--out", "{out}"),
          420, 120, default=False),
)
BY_NAME = {stage.name: stage for stage in STAGES}


@dataclass
class Outcome:
    stage: str
    status: str  # ok | failed (exit N) | timeout | skipped (...)
    seconds: float


def run_stages(stages, out: Path, budget_s: float, python: str = sys.executable, log=print) -> list[Outcome]:
    """Run ``stages`` in order under one deadline (see the module doc); returns their outcomes."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + budget_s
    outcomes: list[Outcome] = []
    for stage in stages:
        left = deadline - time.monotonic()
        if left < stage.min_s:
            outcomes.append(Outcome(stage.name, f"skipped ({left:.0f} s left, needs {stage.min_s} s)", 0.0))
        else:
            limit = min(stage.timeout_s, left)
            log(f"=== {stage.name}: {stage.what} (limit {limit:.0f} s, {left:.0f} s left) ===")
            outcomes.append(_run_one(stage, [python, *(a.replace("{out}", str(out)) for a in stage.args)], limit))
        _write_status(out / "run_gpu.md", outcomes, time.monotonic() - started, budget_s)
    return outcomes


def _run_one(stage: Stage, command: list[str], limit: float) -> Outcome:
    """Run one stage in its own process group; kill the whole group at ``limit`` seconds."""
    begin = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True)
    try:
        code = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return Outcome(stage.name, "timeout", time.monotonic() - begin)
    return Outcome(stage.name, "ok" if code == 0 else f"failed (exit {code})", time.monotonic() - begin)


def _write_status(path: Path, outcomes: list[Outcome], elapsed: float, budget_s: float) -> None:
    lines = [f"# bench/run_gpu.py: {elapsed:.0f} s of a {budget_s:.0f} s budget", "",
             "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {o.stage} | {o.status} | {o.seconds:.1f} |" for o in outcomes]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bash bench/run_gpu.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", metavar="STAGE",
                        help=f"stages to run, in this order (default: {' '.join(s.name for s in STAGES if s.default)})")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO_ROOT / "bench" / "results"),
                        help="where every stage writes its rows (default: $OUT, else bench/results)")
    parser.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                        help="global deadline: no stage starts or keeps running after it (default %(default)s)")
    parser.add_argument("--list", action="store_true", help="print the stages and exit")
    args = parser.parse_args(argv)
    if args.list:
        for s in STAGES:
            print(f"{s.name:18s} limit {s.timeout_s:3d} s, needs {s.min_s:3d} s{'' if s.default else ', extra'}: {s.what}")
        return 0
    unknown = [name for name in args.stages if name not in BY_NAME]
    if unknown:
        print(f"error: unknown stage '{unknown[0]}' (expected one of: {' '.join(BY_NAME)})", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: these stages need a CUDA device (python -m bench.loss --quick checks the harness on a CPU)",
              file=sys.stderr)
        return 1
    stages = [BY_NAME[name] for name in args.stages] if args.stages else [s for s in STAGES if s.default]
    outcomes = run_stages(stages, args.out, 60 * args.budget_minutes, python=os.environ.get("PYTHON", sys.executable))
    print((args.out / "run_gpu.md").read_text())
    return 0 if all(o.status == "ok" or o.status.startswith("skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
