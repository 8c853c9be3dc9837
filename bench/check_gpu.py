"""One-shot GPU verification of the fused SFR kernels (``sfr_loss(..., backend="triton")``).

Run on a CUDA machine (estimated 3-5 minutes on an H100 without memcheck, 2-4 more with it; it starts
no check after ``--budget-minutes`` (9) and cuts memcheck short to fit one 10-minute command)::

    python bench/check_gpu.py --out bench/results/check_gpu.md
    python bench/check_gpu.py --skip-memcheck --out check_gpu.md      # or in two commands:
    python bench/check_gpu.py --only memcheck --out memcheck.md

Checks, each printed as a table row and written to the markdown summary:

1. **accuracy** -- loss and every gradient (hidden, every head parameter) of the Triton path against
   the reference for float32, bfloat16 and float16 heads, on a realistic shape and odd ones (N=1,
   N=37, non-power-of-two D/E/width, M in {1, 3, 4}, anchor_index with duplicates, explicit
   noise/time, weights, both reductions, every time sampling, N=8192 under a 2**16 loss scale).
   **autocast** -- a float32 head under bf16/fp16 autocast against the float32 reference, with the
   bf16/fp16 rule below (the autocast reference in place of torch_lowp). Tolerances (``TOLERANCES``):

   ========  ==========================================================================
   float32   ``max|triton - ref32| <= 1e-4 * max|ref32| + 1e-6`` (TF32 disabled in torch)
   bf16/fp16 ``max|triton - ref32| <= 2 * max|torch_lowp - ref32| + 1e-3 * max|ref32|``:
             the fused path may be no less accurate than the reference run in the same
             low precision (ref32 = the reference on the very same low-precision weights,
             buffers and hidden states, upcast to float32: only arithmetic error is compared)
   ========  ==========================================================================

2. **determinism** -- two runs with the same seed give bit-identical loss and gradients; **no host
   sync** -- forward+backward under ``torch.cuda.set_sync_debug_mode("error")``.
3. **cuda graph** -- forward+backward captured once, replayed with the device seed advanced inside
   the graph (with a device ``anchor_offset``); every replay is compared with the eager reference.
4. **torch.compile** -- a small model calling ``sfr_loss`` compiled with inductor (fullgraph),
   against eager.
5. **large offsets** -- N*M*E > 2**31: a slice of the last anchors (weights zero elsewhere, "sum")
   against the reference fed the same draws at their global int64 offsets.
6. **memcheck** -- the script re-executes itself with ``--sanitizer`` (a small subset) under
   ``compute-sanitizer --tool memcheck`` with PyTorch's caching allocator disabled.

Exit status 0 when every check passes. On a CPU-only machine only ``--help`` and ``--smoke-cpu`` (a
self-test of this script: tiny float32 shapes under the Triton interpreter) run.
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"  # "cpu" only for --smoke-cpu (a self-test of this script under TRITON_INTERPRET=1)
SMOKE = False  # shrink every shape (self-test)

TOLERANCES = {
    "float32": dict(rel=1e-4, floor=1e-6),
    "bfloat16": dict(factor=2.0, rel=1e-3),
    "float16": dict(factor=2.0, rel=1e-3),
}


CHECKS = ("accuracy", "autocast", "determinism", "no-host-sync", "cuda-graph", "compile", "large-offsets", "memcheck")


@dataclass
class Row:
    check: str
    case: str
    metric: str
    value: str
    limit: str
    ok: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="check_gpu.py",
        description="Verify the fused Triton SFR kernels on a CUDA GPU against the PyTorch reference: "
                    "accuracy in fp32/bf16/fp16, determinism, CUDA-graph replay with an advancing device "
                    "seed, torch.compile, int64 offsets beyond 2**31 and compute-sanitizer memcheck.",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="write a markdown summary here (written to a temporary file, then renamed)")
    parser.add_argument("--sanitizer", action="store_true",
                        help="run only the small subset meant for compute-sanitizer (used by the re-exec)")
    parser.add_argument("--skip-memcheck", action="store_true",
                        help="do not re-execute under compute-sanitizer (it is slow)")
    parser.add_argument("--skip-large", action="store_true",
                        help="skip the N*M*E > 2**31 check (it needs ~20 GiB of GPU memory)")
    parser.add_argument("--large-anchors", type=int, default=1_500_000,
                        help="anchors for the large-offset check (with M=4, E=384: 2.3e9 > 2**31 offsets)")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="self-test of this script on the CPU under TRITON_INTERPRET=1: float32 only, tiny "
                             "shapes, no host-sync/CUDA-graph/memcheck checks; proves nothing about the GPU")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=None, metavar="CHECK",
                        help=f"run only these checks, of: {' '.join(CHECKS)}")
    parser.add_argument("--memcheck-timeout", type=int, default=420,
                        help="seconds allowed for the compute-sanitizer re-exec (at most what --budget-minutes leaves)")
    parser.add_argument("--quick", action="store_true",
                        help="accuracy: the main cases (realistic, odd sizes with depth 3, duplicated anchors with "
                             "weights) in float32 and bfloat16 only (bench/run_gpu.py's first stage)")
    parser.add_argument("--budget-minutes", type=float, default=9.0,
                        help="start no check after this many minutes and cut memcheck short to fit (default 9: "
                             "one 10-minute command)")
    return parser


# ---------------------------------------------------------------------------------------------
# helpers (imported lazily: torch/triton are needed only when the checks run)


def _setup():
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be true float32
    torch.backends.cudnn.allow_tf32 = False
    return torch


def make_head(torch, d, e, width, depth, features, seed=0):
    from sfr import FlowHead

    torch.manual_seed(seed)
    head = FlowHead(d, e, width=width, depth=depth, time_features=features)
    with torch.no_grad():
        head.out.weight.normal_(0, 0.1)
        head.out.bias.normal_(0, 0.1)
    return head.to(DEVICE)


def loss_and_grads(torch, backend, hidden, target, head, loss_scale=1.0, **kwargs):
    """Loss and float32 gradients of ``loss * loss_scale`` divided by ``loss_scale`` again, as a GradScaler
    does (``sfr_kernels.testing.loss_and_grads``: it refuses a head the fused path would not compute)."""
    from sfr_kernels.testing import loss_and_grads as unscaled

    loss, grads = unscaled(backend, hidden, target, head, loss_scale, **kwargs)
    return loss, {k: None if g is None else g.float() / loss_scale for k, g in grads.items()}


def _max_err(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _max_abs(a) -> float:
    return float(a.double().abs().max()) if a is not None and a.numel() else 0.0


# case name -> (N, M, D, E, width, F, depth, extra kwargs builder(N, M, E))
def accuracy_cases(torch):
    def dup_index(n, rows):
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, rows, (n,), generator=g).to(DEVICE)

    cases = {
        "realistic N=512 M=4 D=896 E=384 Hd=1024": (512, 4, 896, 384, 1024, 64, 2, lambda n, m, e: {}),
        "N=1 M=1": (1, 1, 64, 384, 256, 64, 2, lambda n, m, e: {}),
        "N=37 M=3 D=1000 E=300 Hd=200 F=10 depth3": (37, 3, 1000, 300, 200, 10, 3, lambda n, m, e: {}),
        "anchor_index dups, weights, sum, logit_normal": (
            300, 3, 512, 384, 512, 64, 2,
            lambda n, m, e: dict(anchor_index=dup_index(n, 2 * n), weight=torch.rand(n).to(DEVICE),
                                 reduction="sum", time_sampling="logit_normal", grad_scale=0.3)),
        "explicit noise/time, grad_scale=0": (
            64, 3, 384, 384, 256, 64, 2,
            lambda n, m, e: dict(noise=torch.randn(n, m, e).to(DEVICE), time=torch.rand(n, m).to(DEVICE),
                                 grad_scale=0.0)),
        "MTP (std=0, zero time)": (128, 1, 768, 768, 512, 64, 2,
                                   lambda n, m, e: dict(source_std=0.0, time_sampling="zero")),
        # dL/dv ~ 1/(M E N) is below float16's normal range: the fp16 loss scale must reach it intact.
        "N=8192 M=4, loss scale 2**16": (8192, 4, 896, 384, 1024, 64, 2,
                                         lambda n, m, e: dict(loss_scale=2.0 ** 16)),
    }
    if SMOKE:  # same cases, tiny sizes (odd ones stay odd)
        cases = {k: (min(n, 9), m, min(d, 40) + d % 3, min(e, 24) + e % 5, min(w, 24), f, depth, x)
                 for k, (n, m, d, e, w, f, depth, x) in cases.items()}
    return cases


def check_accuracy(torch, rows: list[Row], subset: bool = False, quick: bool = False) -> None:
    cases = accuracy_cases(torch)
    if subset:
        cases = {k: cases[k] for k in list(cases)[1:4]}
    if quick:
        cases = {k: cases[k] for k in (list(cases)[0], list(cases)[2], list(cases)[3])}
    # The interpreter mis-computes 16-bit arithmetic: the CPU self-test checks float32 only.
    dtypes = (torch.float32,) if SMOKE else (torch.float32, torch.bfloat16, torch.float16)
    if subset or quick:  # one 32-bit and one 16-bit head cover every kernel
        dtypes = dtypes[:2]
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        for case, spec in cases.items():
            try:
                rows.append(_accuracy_row(torch, name, dtype, case, spec))
            except Exception as exc:  # one failing case must not hide the other cases and dtypes
                rows.append(Row("accuracy", f"{name}: {case}", "exception", f"{type(exc).__name__}: "
                                f"{str(exc)[:100]}".replace("|", "/"), "none", False))


def _accuracy_row(torch, name, dtype, case, spec) -> Row:
    """One accuracy case: the worst error/limit ratio over the loss and every gradient."""
    n, m, d, e, width, features, depth, extra = spec
    kwargs = dict(num_samples=m, seed=1234, **extra(n, m, e))
    rows_in_hidden = 2 * n if "anchor_index" in kwargs else n
    hidden32 = torch.randn(rows_in_hidden, d, device=DEVICE)
    target = torch.nn.functional.normalize(torch.randn(n, e, device=DEVICE), dim=-1)
    if dtype == torch.float32:
        head32 = make_head(torch, d, e, width, depth, features)
        ref32 = loss_and_grads(torch, "torch", hidden32, target, head32, **kwargs)
        ours = loss_and_grads(torch, "triton", hidden32, target, head32, **kwargs)
        lowp = None
    else:  # .to(dtype) rounds the time_frequencies buffer too
        head, hidden = make_head(torch, d, e, width, depth, features).to(dtype), hidden32.to(dtype)
        # The same rounded weights, buffers and hidden states in float32: only arithmetic error counts.
        ref32 = loss_and_grads(torch, "torch", hidden.float(), target, copy.deepcopy(head).float(), **kwargs)
        ours = loss_and_grads(torch, "triton", hidden, target, head, **kwargs)
        lowp = loss_and_grads(torch, "torch", hidden, target, head, **kwargs)
    return _worst_row("accuracy", f"{name}: {case}", name, ref32, ours, lowp)


def _worst_row(check: str, case: str, dtype_name: str, ref32, ours, lowp) -> Row:
    """The worst ``error / limit`` over the loss and every gradient of ``ours`` against ``ref32``
    (``TOLERANCES``: float32's rule when ``lowp`` is None, else the low-precision rule with ``lowp``,
    the reference run in that precision, as the baseline)."""
    worst_ok, worst_ratio, worst_name = True, 0.0, ""
    for key in ["loss", *ref32[1]]:
        ref = ref32[0] if key == "loss" else ref32[1][key]
        err = _max_err(ours[0] if key == "loss" else ours[1][key], ref)
        if lowp is None:
            tol = TOLERANCES["float32"]
            limit = tol["rel"] * _max_abs(ref) + tol["floor"]
        else:
            tol = TOLERANCES[dtype_name]
            base = _max_err(lowp[0] if key == "loss" else lowp[1][key], ref)
            limit = tol["factor"] * base + tol["rel"] * _max_abs(ref)
        ratio = err / limit if limit > 0 else (0.0 if err == 0 else float("inf"))
        if ratio > worst_ratio:
            worst_ratio, worst_name = ratio, key
        worst_ok &= err <= limit
    return Row(check, case, f"worst err/limit ({worst_name})", f"{worst_ratio:.3f}", "<= 1", worst_ok)


def check_autocast(torch, rows: list[Row]) -> None:
    """A float32 head under autocast (as ``sfr train --bf16`` runs it): the fused op casts its weights to
    the autocast dtype like the reference's Linear layers; both are compared with float32 arithmetic."""
    n, m, d, e, width = (9, 3, 40, 24, 24) if SMOKE else (1024, 4, 896, 384, 1024)
    # The interpreter computes bfloat16 wrongly: the CPU self-test checks float16 autocast only.
    for dtype in (torch.float16,) if SMOKE else (torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        head = make_head(torch, d, e, width, 2, 64)
        hidden = torch.randn(n, d, device=DEVICE)
        target = torch.nn.functional.normalize(torch.randn(n, e, device=DEVICE), dim=-1)
        kwargs = dict(num_samples=m, seed=99, loss_scale=2.0 ** 12)
        exact = loss_and_grads(torch, "torch", hidden, target, head, **kwargs)
        with torch.autocast(DEVICE, dtype=dtype):
            ours = loss_and_grads(torch, "triton", hidden, target, head, **kwargs)
            theirs = loss_and_grads(torch, "torch", hidden, target, head, **kwargs)
        rows.append(_worst_row("autocast", f"{name}: float32 head, N={n} M={m}", name, exact, ours, theirs))


def check_determinism(torch, rows: list[Row]) -> None:
    n, m, d, e, width = (16, 3, 40, 24, 32) if SMOKE else (512, 4, 896, 384, 1024)
    for dtype in (torch.float32,) if SMOKE else (torch.float32, torch.bfloat16):
        head = make_head(torch, d, e, width, 2, 64).to(dtype)
        hidden = torch.randn(3 * n, d, device=DEVICE, dtype=dtype)
        target = torch.randn(n, e, device=DEVICE)
        kwargs = dict(num_samples=m, seed=7, anchor_index=torch.randint(0, 3 * n, (n,), device=DEVICE),
                      weight=torch.rand(n, device=DEVICE), grad_scale=0.5)
        first = loss_and_grads(torch, "triton", hidden, target, head, **kwargs)
        second = loss_and_grads(torch, "triton", hidden, target, head, **kwargs)
        same = torch.equal(first[0], second[0]) and all(torch.equal(first[1][k], second[1][k]) for k in first[1])
        rows.append(Row("determinism", str(dtype).replace("torch.", ""), "bit-identical loss+grads",
                        str(same), "True", same))


def check_no_host_sync(torch, rows: list[Row]) -> None:
    """Forward + backward under ``torch.cuda.set_sync_debug_mode("error")``: any host sync raises."""
    n, m, d, e = 128, 2, 256, 384
    head = make_head(torch, d, e, 256, 2, 64)
    hidden = torch.randn(2 * n, d, device=DEVICE)
    target = torch.randn(n, e, device=DEVICE)
    cases = {
        "device seed, anchor_index, weights, mean": dict(
            anchor_index=torch.randint(0, 2 * n, (n,), device=DEVICE), num_samples=m,
            seed=torch.tensor(5, device=DEVICE), weight=torch.rand(n, device=DEVICE), grad_scale=0.5),
        "int seed, no index, no weights, mean": dict(num_samples=m, seed=5, grad_scale=0.5),
        "int seed, sum": dict(num_samples=m, seed=5, reduction="sum", grad_scale=0.5),
        "int seed, int anchor_offset": dict(num_samples=m, seed=5, anchor_offset=3, grad_scale=0.5),
        "device seed, device anchor_offset": dict(num_samples=m, seed=torch.tensor(5, device=DEVICE),
                                                  anchor_offset=torch.tensor(3, device=DEVICE), grad_scale=0.5),
        "CPU-tensor seed and anchor_offset": dict(num_samples=m, seed=torch.tensor(5), anchor_offset=torch.tensor(3),
                                                  grad_scale=0.5),
    }
    for case, kwargs in cases.items():
        h = hidden[:n] if "anchor_index" not in kwargs else hidden
        loss_and_grads(torch, "triton", h, target, head, **kwargs)  # warm-up: kernel compilation may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss_and_grads(torch, "triton", h, target, head, **kwargs)
            ok, value = True, "none"
        except RuntimeError as exc:
            ok, value = False, str(exc)[:80].replace("|", "/")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows.append(Row("no host sync", f"fwd+bwd, {case}", "sync detected", value, "none", ok))


def check_cuda_graph(torch, rows: list[Row], replays: int = 4) -> None:
    from sfr_kernels import sfr_loss

    n, m, d, e, width = 256, 2, 512, 384, 512
    head = make_head(torch, d, e, width, 2, 64)
    hidden = torch.randn(2 * n, d, device=DEVICE, requires_grad=True)
    target = torch.randn(n, e, device=DEVICE)
    anchor_index = torch.randint(0, 2 * n, (n,), device=DEVICE)
    base_seed, offset = 100, 7
    seed = torch.full((), base_seed, dtype=torch.int64, device=DEVICE)
    anchor_offset = torch.full((), offset, dtype=torch.int64, device=DEVICE)  # as SFRTrainer passes it

    def step():
        loss = sfr_loss(hidden, target, head, anchor_index=anchor_index, num_samples=m, seed=seed,
                        anchor_offset=anchor_offset, grad_scale=0.5, backend="triton")
        loss.backward()
        seed.add_(1)  # the seed advances inside the graph: each replay draws fresh noise
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: compile kernels, populate allocator pools
            hidden.grad = None
            head.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    params = dict(head.named_parameters())
    ref_head = copy.deepcopy(head)  # the reference must not touch the graph's static .grad buffers
    seed.fill_(base_seed)
    worst, ok = 0.0, True
    for i in range(replays):
        for p in [hidden, *params.values()]:
            p.grad.zero_()  # the replay must rewrite every static .grad buffer (captured with .grad None)
        graph.replay()
        torch.cuda.synchronize()
        got_loss = static_loss.detach().clone()
        got = {"hidden": hidden.grad.clone(), **{k: p.grad.clone() for k, p in params.items()}}
        ref_loss, ref = loss_and_grads(torch, "torch", hidden, target, ref_head, anchor_index=anchor_index,
                                       num_samples=m, seed=base_seed + i, anchor_offset=offset, grad_scale=0.5)
        for ours, want in [(got_loss, ref_loss), *[(got[k], ref[k]) for k in ref]]:
            err, limit = _max_err(ours, want), 1e-4 * _max_abs(want) + 1e-6
            worst = max(worst, err / limit)
            ok &= err <= limit
    seed_advanced = int(seed) == base_seed + replays
    rows.append(Row("cuda graph", f"{replays} replays, seed advanced in-graph, device anchor_offset",
                    "worst err/limit vs eager ref",
                    f"{worst:.3f}", "<= 1", ok))
    rows.append(Row("cuda graph", "device seed after replays", "seed", str(int(seed)), str(base_seed + replays),
                    seed_advanced))


def check_compile(torch, rows: list[Row]) -> None:
    from sfr_kernels import sfr_loss

    d, e, n = 256, 384, 128
    head = make_head(torch, d, e, 256, 2, 64)
    body = torch.nn.Linear(d, d).to(DEVICE)

    def fn(x, target, seed):
        return sfr_loss(torch.tanh(body(x)), target, head, num_samples=2, seed=seed, grad_scale=0.5,
                        backend="triton")

    x, target, seed = torch.randn(n, d, device=DEVICE), torch.randn(n, e, device=DEVICE), torch.tensor(3, device=DEVICE)
    params = [*body.parameters(), *head.parameters()]

    def run(f):
        for p in params:
            p.grad = None
        loss = f(x, target, seed)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    eager = run(fn)
    try:
        compiled = run(torch.compile(fn, fullgraph=True))
        err = max([_max_err(compiled[0], eager[0])] + [_max_err(a, b) / max(_max_abs(b), 1e-12)
                                                       for a, b in zip(compiled[1], eager[1])])
        rows.append(Row("torch.compile", "inductor, fullgraph", "max rel err vs eager", f"{err:.2e}", "<= 1e-4",
                        err <= 1e-4))
    except Exception as exc:  # report, do not abort the other checks
        rows.append(Row("torch.compile", "inductor, fullgraph", "error", type(exc).__name__, "none", False))


def check_large_offsets(torch, rows: list[Row], num_anchors: int) -> None:
    """N*M*E > 2**31: the last anchors (the largest offsets) against the reference."""
    from sfr_kernels import philox

    m, d, e, width, slice_len = (4, 16, 24, 16, 8) if SMOKE else (4, 64, 384, 64, 64)
    n = num_anchors
    total = n * m * e
    head = make_head(torch, d, e, width, 2, 16)
    hidden = torch.randn(n, d, device=DEVICE)
    target = torch.randn(n, e, device=DEVICE)
    weight = torch.zeros(n, device=DEVICE)
    first = n - slice_len
    weight[first:] = 1.0
    seed = 2**33 + 5
    loss, grads = loss_and_grads(torch, "triton", hidden, target, head, num_samples=m, seed=seed, weight=weight,
                                 reduction="sum")
    anchors = torch.arange(first, n, device=DEVICE)
    sample_rows = anchors[:, None] * m + torch.arange(m, device=DEVICE)  # global a*M + m
    noise = philox.randn(seed, sample_rows[..., None] * e + torch.arange(e, device=DEVICE))
    time_ = philox.rand(seed + 1, sample_rows)
    ref_loss, ref = loss_and_grads(torch, "torch", hidden[first:], target[first:], head, num_samples=m,
                                   noise=noise, time=time_, reduction="sum")
    ref["hidden"] = torch.cat([torch.zeros_like(hidden[:first]), ref["hidden"]])
    worst, ok = 0.0, True
    for got, want in [(loss, ref_loss), *[(grads[k], ref[k]) for k in ref]]:
        err, limit = _max_err(got, want), 1e-4 * _max_abs(want) + 1e-6
        worst = max(worst, err / limit)
        ok &= err <= limit
    rows.append(Row("large offsets", f"N={n} M={m} E={e}: N*M*E={total:.3g} > 2**31={2**31:.3g}",
                    f"last {slice_len} anchors: worst err/limit", f"{worst:.3f}", "<= 1",
                    ok and (total > 2**31 or SMOKE)))


def find_sanitizer() -> str | None:
    """``compute-sanitizer`` on the PATH, else in ``$CUDA_HOME/bin`` or ``/usr/local/cuda*/bin``."""
    candidates = [shutil.which("compute-sanitizer"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer"),
                  *sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"), reverse=True)]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def run_memcheck(rows: list[Row], timeout: int) -> None:
    sanitizer = find_sanitizer()
    if sanitizer is None:
        rows.append(Row("memcheck", "compute-sanitizer", "found", "no", "yes", False))
        return
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # let memcheck see every allocation
    cmd = [sanitizer, "--tool", "memcheck", "--error-exitcode", "99", sys.executable, str(Path(__file__).resolve()),
           "--sanitizer"]
    start = time.time()
    try:
        # Its own session: on a timeout the whole group goes (the Python child of compute-sanitizer
        # included, which would otherwise keep the GPU busy).
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        rows.append(Row("memcheck", "--sanitizer subset", "result", f"timeout after {timeout}s", "finished", False))
        return
    lines = (stdout + stderr).strip().splitlines()
    summary = next((line for line in reversed(lines) if "ERROR SUMMARY" in line), f"exit {proc.returncode}")
    if proc.returncode != 0:  # show what went wrong: the reply of a device call carries only the output
        print("\n".join(["compute-sanitizer output (last 40 lines):", *lines[-40:]]), flush=True)
    rows.append(Row("memcheck", f"--sanitizer subset ({time.time() - start:.0f}s)", "result",
                    summary.strip(" =").replace("|", "/"), "0 errors, exit 0", proc.returncode == 0))


def environment(torch) -> str:
    import triton

    from bench.common import git_commit

    commit = git_commit()
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (Triton interpreter self-test, not a GPU result)"
    return (f"device {device}, torch {torch.__version__}, triton {triton.__version__}, "
            f"python {platform.python_version()}, commit {commit}")


def render(rows: list[Row], env: str) -> str:
    lines = ["# Fused SFR kernels: GPU check", "", env, "",
             "| check | case | metric | value | limit | ok |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.check} | {r.case} | {r.metric} | {r.value} | {r.limit} | {'PASS' if r.ok else 'FAIL'} |"
              for r in rows]
    passed = sum(r.ok for r in rows)
    lines += ["", f"{passed}/{len(rows)} checks passed.", ""]
    return "\n".join(lines)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def main(argv=None) -> int:
    global DEVICE, SMOKE
    started = time.time()
    args = build_parser().parse_args(argv)
    if args.smoke_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before sfr_kernels defines its kernels
        DEVICE, SMOKE = "cpu", True
        args.skip_memcheck = True
        args.large_anchors = min(args.large_anchors, 40)
    torch = _setup()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("check_gpu.py needs a CUDA GPU (the kernels' CPU path is tested by pytest under TRITON_INTERPRET=1).")
        return 2
    rows: list[Row] = []
    deadline = started + 60 * args.budget_minutes
    if args.sanitizer:  # small subset: each kernel, both dtypes classes, anchor scatter
        check_accuracy(torch, rows, subset=True)
        bad = [r for r in rows if not r.ok]
        print(render(rows, environment(torch)))
        return 1 if bad else 0

    steps = {"accuracy": lambda: check_accuracy(torch, rows, quick=args.quick),
             "autocast": lambda: check_autocast(torch, rows),
             "determinism": lambda: check_determinism(torch, rows),
             "no-host-sync": lambda: check_no_host_sync(torch, rows),
             "cuda-graph": lambda: check_cuda_graph(torch, rows),
             "compile": lambda: check_compile(torch, rows),
             "large-offsets": lambda: check_large_offsets(torch, rows, args.large_anchors),
             "memcheck": lambda: run_memcheck(rows, min(args.memcheck_timeout, int(deadline - time.time())))}
    skipped = {"no-host-sync", "cuda-graph"} if DEVICE != "cuda" else set()  # the CPU self-test has no CUDA
    if args.skip_large:
        skipped.add("large-offsets")
    if args.skip_memcheck:
        skipped.add("memcheck")
    for name in [name for name in args.only or CHECKS if name not in skipped]:
        start = time.time()
        if start > deadline - 10:
            rows.append(Row(name, "not run", "time", f"{(start - started) / 60:.1f} min", "--budget-minutes", False))
            continue
        try:
            steps[name]()
        except Exception as exc:  # one failing check must not hide the others
            rows.append(Row(name, "exception", type(exc).__name__, str(exc)[:120].replace("|", "/"), "none", False))
        print(f"[{name}] done in {time.time() - start:.1f}s", flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        if args.out is not None:  # after every check: a run stopped from outside keeps what it checked
            write_atomically(args.out, render(rows, environment(torch)))

    text = render(rows, environment(torch))
    print(text)
    if args.out is not None:
        write_atomically(args.out, text)
        print(f"summary written to {args.out}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
