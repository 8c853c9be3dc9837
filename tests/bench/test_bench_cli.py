"""CI checks of the benchmark harness: the --quick CLIs run on the CPU and write well-formed results.

The numbers themselves are CPU timings of the reference (harness checks, never kernel results), so
the tests check structure and internal consistency, not speed.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common
from bench.plot import headline_markdown, headline_numbers

REPO_ROOT = Path(__file__).resolve().parents[2]
ON_GPU = torch.cuda.is_available()


def _run(*args, timeout=180):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _read(path):
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = [dict(zip(header, row)) for row in reader]
    return header, rows


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_results")
    loss_stdout = _run("bench.loss", "--quick", "--out", str(out))
    step_stdout = _run("bench.step", "--quick", "--out", str(out))
    plot_stdout = _run("bench.plot", "--results", str(out), "--out", str(out / "plots"), "--table", "--allow-cpu")
    return out, loss_stdout, step_stdout, plot_stdout


def _check_quantiles(row):
    p20, p50, p80 = (float(row[k]) for k in ("p20", "p50", "p80"))
    assert 0 < p20 <= p50 <= p80, row


def test_loss_quick_csv(quick_results):
    out, stdout, _, _ = quick_results
    header, rows = _read(out / "loss.csv")
    assert tuple(header) == common.CSV_COLUMNS
    env = common.environment(torch.device("cuda" if ON_GPU else "cpu"))
    for row in rows:
        assert row["device"] == env["device"] and row["torch"] == torch.__version__
        assert row["commit"] == env["commit"] and row["timestamp"].endswith("Z")
    device_rows = {(r["mode"], r["metric"]) for r in rows if r["kernel"] == "device"}
    assert device_rows == {("gemm", "tflops"), ("copy", "bandwidth")}
    loss_rows = [r for r in rows if r["kernel"] == "sfr_loss"]
    if ON_GPU:
        return  # the shape and provider set differ on a GPU; the CPU layout is what CI checks
    assert "triton skipped on the CPU" in stdout and "NOT kernel results" in stdout
    got = {(r["provider"], r["mode"], r["metric"]) for r in loss_rows}
    want = {(provider, mode, metric) for provider in ("torch-eager", "torch-eager-philox") for mode in ("full", "forward")
            for metric in ("time", "tflops", "roofline_pct")}
    assert got == want  # no memory rows on the CPU, no triton rows, no other modes
    for r in loss_rows:
        assert (r["N"], r["M"], r["D"], r["E"], r["width"], r["depth"], r["dtype"]) == ("256", "1", "896", "384", "1024", "2", "fp32")
        _check_quantiles(r)
    # TFLOP/s and roofline % are derived from the time row with the documented formulas.
    shape = common.LossShape(N=256, M=1, D=896, E=384)
    gemm = float(next(r["p50"] for r in rows if r["mode"] == "gemm"))
    bandwidth = float(next(r["p50"] for r in rows if r["mode"] == "copy"))
    for mode in ("full", "forward"):
        by_metric = {r["metric"]: float(r["p50"]) for r in loss_rows if r["mode"] == mode}
        flops = common.loss_flops(shape, mode)
        assert by_metric["tflops"] == pytest.approx(flops / (by_metric["time"] * 1e-3) / 1e12, rel=1e-4)
        roof = common.roofline_ms(flops, common.loss_min_bytes(shape, mode, 4), gemm, bandwidth)
        assert by_metric["roofline_pct"] == pytest.approx(roof / by_metric["time"] * 100, rel=1e-4)


def test_step_quick_csv(quick_results):
    out, _, stdout, _ = quick_results
    header, rows = _read(out / "step.csv")
    assert tuple(header) == common.CSV_COLUMNS
    assert all(r["kernel"] == "step" for r in rows)
    if ON_GPU:
        return
    assert "sdpa+" in rows[0]["provider"] and "CE" in stdout
    times = {r["mode"]: r for r in rows if r["metric"] == "time"}
    assert set(times) == {"sft", "sft+sfr"}
    for r in times.values():
        _check_quantiles(r)
        assert (r["N"], r["D"], r["E"], r["width"], r["depth"]) == ("128", "64", "384", "1024", "2")  # 2x64 tokens
    overhead = [r for r in rows if r["metric"] == "time_overhead"]
    assert len(overhead) == 1 and overhead[0]["mode"] == "sft+sfr"
    expected = (float(times["sft+sfr"]["p50"]) / float(times["sft"]["p50"]) - 1) * 100
    assert float(overhead[0]["p50"]) == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert not any(r["metric"].startswith("memory") for r in rows)  # not measured on the CPU


def test_plot_writes_pngs_and_table(quick_results):
    out, _, _, stdout = quick_results
    pngs = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"step_overhead.png", "loss_roofline_fp32.png" if not ON_GPU else "loss_roofline_bf16.png"} <= names
    assert any(n.startswith("loss_time_") for n in names)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = (out / "plots" / "headline.md").read_text()
    if not ON_GPU:
        assert "NOT kernel results" in table
        assert "| qwen2.5-0.5b+minilm | 256 | 1 | fp32 |" in table
        assert "| tiny | 128 |" in table


def test_table_never_shows_cpu_rows_by_default(quick_results):
    out = quick_results[0]
    _, loss_rows = _read(out / "loss.csv")
    _, step_rows = _read(out / "step.csv")
    cpu = common.device_name(torch.device("cpu"))
    assert common.is_cpu_device(cpu)
    # The quick run's rows as a CPU writes them (on a GPU machine they name the GPU, so relabel them).
    loss_rows = [dict(r, device=cpu) for r in loss_rows]
    step_rows = [dict(r, device=cpu) for r in step_rows]
    table = headline_markdown(loss_rows, step_rows)
    assert "No GPU results yet" in table and "qwen2.5-0.5b+minilm" not in table and "| tiny |" not in table
    # ... while --allow-cpu lets the very same rows in, titled as a harness check
    allowed = headline_markdown(loss_rows, step_rows, allow_cpu=True)
    assert "NOT kernel results" in allowed and "| tiny |" in allowed and "No GPU results yet" not in allowed


def _gpu_row(**fields):
    env = dict(device="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0", commit="abc1234",
               timestamp="2026-01-01T00:00:00Z")
    return common.make_row(env, **fields)


def test_headline_ratios_and_targets():
    shape = dict(kernel="sfr_loss", mode="full", N=16384, M=4, D=3584, E=768, width=1024, depth=2, dtype="bf16")
    rows = [_gpu_row(provider="torch-eager", metric="time", unit="ms", p50=9.0, **shape),
            _gpu_row(provider="torch-compile:max-autotune-no-cudagraphs", metric="time", unit="ms", p50=4.0, **shape),
            _gpu_row(provider="triton", metric="time", unit="ms", p50=2.0, **shape),
            _gpu_row(provider="torch-eager", metric="memory", unit="MB", p50=1000.0, **shape),
            _gpu_row(provider="torch-compile:max-autotune-no-cudagraphs", metric="memory", unit="MB", p50=800.0, **shape),
            _gpu_row(provider="triton", metric="memory", unit="MB", p50=200.0, **shape),
            _gpu_row(provider="triton", metric="roofline_pct", unit="%", p50=70.0, **shape)]
    table = headline_markdown(rows, [])
    assert "| qwen2.5-7b+mpnet | 16384 | 4 | bf16 | 9.000 | 4.000 | 2.000 | 4.50× | 2.00× | 0.20× | 0.25× | 70.0% |" in table
    assert "| triton vs torch-eager speed-up (full) | >= 3× | 4.50× | yes |" in table
    assert "| triton % of roofline (full) | >= 65% | 70.00% | yes |" in table
    assert "| end-to-end SFR time overhead, qwen2.5-1.5b | <= 2% | — | — |" in table


def test_flop_formula_matches_flop_counter():
    """bench.common.loss_flops against torch's FlopCounterMode on the reference (GEMMs only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sfr.head import FlowHead
    from sfr_kernels import sfr_loss

    shape = common.LossShape(N=24, M=3, D=40, E=20, width=32, depth=3, time_features=8)
    head = FlowHead(shape.D, shape.E, width=shape.width, depth=shape.depth, time_features=shape.time_features)
    head.out.reset_parameters()
    hidden = torch.randn(shape.N, shape.D, requires_grad=True)
    target = torch.nn.functional.normalize(torch.randn(shape.N, shape.E), dim=-1)
    with FlopCounterMode(display=False) as forward_counter:
        loss = sfr_loss(hidden, target, head, num_samples=shape.M, backend="torch")
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    assert forward_counter.get_total_flops() == common.loss_flops(shape, "forward")
    assert backward_counter.get_total_flops() == common.loss_flops(shape, "backward")
    assert sum(p.numel() for p in head.parameters()) == shape.head_params()


def test_append_rows_checks_header(tmp_path):
    path = tmp_path / "x.csv"
    row = _gpu_row(kernel="sfr_loss", provider="triton", mode="full", metric="time", unit="ms", p50=1.0)
    common.append_rows(path, [row])
    common.append_rows(path, [row])
    assert len(common.read_rows(path)) == 2
    path.write_text("kernel,provider\nsfr_loss,triton\n")
    with pytest.raises(ValueError, match="header"):
        common.append_rows(path, [row])
    with pytest.raises(ValueError, match="unknown result columns"):
        common.make_row({}, colour="red")


def test_update_results_replaces_only_the_headline_section(tmp_path):
    from bench.plot import MARK_END, MARK_START, update_results_file

    results_md = tmp_path / "RESULTS.md"
    committed = (REPO_ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    assert MARK_START in committed and MARK_END in committed and "No GPU results yet" in committed
    results_md.write_text(committed, encoding="utf-8")
    shape = dict(kernel="sfr_loss", mode="full", N=4096, M=1, D=896, E=384, width=1024, depth=2, dtype="bf16")
    table = headline_markdown([_gpu_row(provider="triton", metric="time", unit="ms", p50=1.5, **shape)], [])
    update_results_file(results_md, table)
    updated = results_md.read_text(encoding="utf-8")
    before, after = committed.split(MARK_START)[0], committed.split(MARK_END)[1]
    assert updated.startswith(before) and updated.endswith(after)
    assert "| qwen2.5-0.5b+minilm | 4096 | 1 | bf16 | — | — | 1.500 |" in updated
    assert "Device: NVIDIA H100 80GB HBM3." in updated
    results_md.write_text("no markers here\n")
    with pytest.raises(ValueError, match="headline"):
        update_results_file(results_md, table)


def test_bench_ms_setup_runs_untimed_before_every_call_with_fresh_grads():
    """``setup``'s value reaches ``fn``; ``.grad`` is None at every timed call (no accumulation)."""
    x = torch.ones(3, requires_grad=True)
    seen = []

    def setup():
        return (x * 2).sum()

    def fn(loss):
        seen.append(x.grad)
        loss.backward()

    p50, p20, p80 = common.bench_ms(fn, torch.device("cpu"), warmup=2, rep=4, grad_to_none=[x], setup=setup)
    assert len(seen) == 6 and all(g is None for g in seen)
    assert 0 < p20 <= p50 <= p80


def test_eager_providers_compute_the_reference_with_native_or_philox_draws():
    """torch-eager is the reference fed with torch.randn/torch.rand draws (what a user writes); torch-eager-philox
    is the reference with the kernels' seeded draws. Both are the same math, bit for bit."""
    from bench.providers import make_head, make_inputs, make_loss_fn
    from sfr_kernels import sfr_loss

    shape = common.LossShape(N=6, M=3, D=16, E=10, width=8, time_features=4)
    head = make_head(shape, torch.device("cpu"), torch.float32)
    inp = make_inputs(shape, torch.device("cpu"), torch.float32, 1)[0]
    torch.manual_seed(5)
    eager = make_loss_fn("torch-eager", head, shape, inp, "default").fn(inp)
    torch.manual_seed(5)
    noise, time_ = torch.randn(shape.N, shape.M, shape.E), torch.rand(shape.N, shape.M)
    assert torch.equal(eager, sfr_loss(inp.hidden, inp.target, head, num_samples=shape.M, noise=noise, time=time_,
                                       backend="torch"))
    philox = make_loss_fn("torch-eager-philox", head, shape, inp, "default").fn(inp)
    assert torch.equal(philox, sfr_loss(inp.hidden, inp.target, head, num_samples=shape.M, seed=int(inp.seed),
                                        backend="torch"))
    assert not torch.equal(eager, philox)  # other random numbers


def test_headline_uses_the_fastest_compile_variant():
    shape = dict(kernel="sfr_loss", mode="full", N=16384, M=4, D=3584, E=768, width=1024, depth=2, dtype="bf16")
    rows = [_gpu_row(provider="triton", metric="time", unit="ms", p50=2.0, **shape),
            _gpu_row(provider="torch-compile:default", metric="time", unit="ms", p50=5.0, **shape),
            _gpu_row(provider="torch-compile:default", metric="memory", unit="MB", p50=500.0, **shape),
            _gpu_row(provider="torch-compile:max-autotune-no-cudagraphs", metric="time", unit="ms", p50=4.0, **shape),
            _gpu_row(provider="torch-compile:max-autotune-no-cudagraphs", metric="memory", unit="MB", p50=800.0,
                     **shape)]
    shapes, _ = headline_numbers(rows, [])
    assert len(shapes) == 1
    assert shapes[0]["compile_ms"] == 4.0 and shapes[0]["speedup_compile"] == 2.0
    assert shapes[0]["memory_compile"] != shapes[0]["memory_compile"]  # NaN: triton has no memory row here


def test_plot_add_merges_fetched_rows_once(tmp_path):
    fetched, results = tmp_path / "fetched", tmp_path / "results"
    row = _gpu_row(kernel="sfr_loss", provider="triton", mode="full", metric="time", unit="ms", p50=1.0, N=4096, M=1,
                   D=896, E=384, width=1024, depth=2, dtype="bf16")
    common.append_rows(fetched / "loss.csv", [row])
    common.append_rows(results / "loss.csv", [dict(row, p50="2")])
    for _ in range(2):
        _run("bench.plot", "--results", str(results), "--add", str(fetched), "--out", str(tmp_path / "png"))
    assert [r["p50"] for r in common.read_rows(results / "loss.csv")] == ["2", "1"]


def test_budget_stops_new_providers_but_keeps_the_device_rows(tmp_path):
    stdout = _run("bench.loss", "--quick", "--budget-minutes", "0", "--out", str(tmp_path))
    assert "skipped (the --budget-minutes budget is used up)" in stdout
    assert {r["kernel"] for r in common.read_rows(tmp_path / "loss.csv")} == {"device"}


def test_run_gpu_script_checks_its_stages():
    script = REPO_ROOT / "bench" / "run_gpu.sh"
    unknown = subprocess.run(["bash", str(script), "lost"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown stage 'lost'" in unknown.stderr
    if not ON_GPU:  # the default stages (headline step compile) need a GPU: refused before any work
        no_gpu = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
        assert no_gpu.returncode == 1 and "need a CUDA device" in no_gpu.stderr
