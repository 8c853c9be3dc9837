"""Plots and the headline table from the benchmark CSVs (``loss.csv``, ``step.csv``).

    python -m bench.plot                                   # PNGs from bench/results into bench/results
    python -m bench.plot --table                           # + print the headline markdown, write headline.md
    python -m bench.plot --table --update-results bench/RESULTS.md   # + replace the table in RESULTS.md
    python -m bench.plot --add FETCHED_DIR --table --update-results bench/RESULTS.md   # + rows from a GPU run first

PNGs (one device: the latest one in each CSV unless ``--device`` picks another):

* ``loss_time_<preset>_<dtype>.png`` -- median time vs N (20-80 % bars), one panel per mode, a line per
  provider and M;
* ``loss_memory_<dtype>.png`` -- peak memory the op adds, mode full, bars per shape and provider
  (CUDA rows only: the CPU has none);
* ``loss_roofline_<dtype>.png`` -- % of roofline, mode full;
* ``step_overhead.png`` -- SFT+SFR time (and peak-memory) overhead over SFT per model shape.

The headline table uses only GPU rows (rows whose device is a CPU are harness checks, never results)
unless ``--allow-cpu`` is given, in which case it is titled as a CPU harness check. For every key the
latest row wins (rows are appended in time order).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from bench import common

HEADLINE = dict(preset=common.HEADLINE_PRESET, N=16384, M=4, mode="full")
STEP_HEADLINE_D = 1536  # qwen2.5-1.5b
TARGETS = (  # (label, key in the headline numbers, comparison, threshold)
    ("triton vs torch-eager speed-up (full)", "speedup_eager", ">=", 3.0),
    ("triton / torch-eager peak memory (full)", "memory_eager", "<=", 0.4),
    ("triton vs torch-compile speed-up (full)", "speedup_compile", ">=", 1.3),
    ("triton % of roofline (full)", "roofline", ">=", 65.0),
    ("end-to-end SFR time overhead, qwen2.5-1.5b", "step_time", "<=", 2.0),
    ("end-to-end SFR peak-memory overhead, qwen2.5-1.5b", "step_memory", "<=", 3.0),
)
MARK_START, MARK_END = "<!-- headline:start -->", "<!-- headline:end -->"
SHAPE_KEYS = ("N", "M", "D", "E", "width", "depth", "dtype")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=common.DEFAULT_RESULTS_DIR,
                        help="directory holding loss.csv / step.csv (default: bench/results)")
    parser.add_argument("--add", type=Path, nargs="+", default=(), metavar="DIR",
                        help="first append the rows of DIR/loss.csv and DIR/step.csv that --results does not have yet "
                             "(e.g. the files fetched from a GPU machine's $OUT)")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: --results)")
    parser.add_argument("--device", default=None, help="plot rows of this device column (default: the latest one)")
    parser.add_argument("--table", action="store_true", help="print the headline markdown table and write headline.md")
    parser.add_argument("--update-results", type=Path, default=None, metavar="RESULTS_MD",
                        help=f"replace the text between {MARK_START} and {MARK_END} in this file with the table")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="let CPU rows into the table (titled as a harness check; never for RESULTS.md)")


def provider_base(provider: str) -> str:
    """``torch-compile:max-autotune-no-cudagraphs`` -> ``torch-compile``."""
    return provider.split(":", 1)[0]


def latest(rows: list[dict]) -> list[dict]:
    """The last row per (kernel, provider, mode, metric, shape, device), in first-seen order."""
    keyed = {}
    for row in rows:
        key = tuple(row[c] for c in ("kernel", "provider", "mode", "metric", *SHAPE_KEYS, "device"))
        keyed.pop(key, None)
        keyed[key] = row
    return list(keyed.values())


def add_results(results: Path, sources) -> None:
    """Append to ``results/{loss,step}.csv`` the rows of ``SOURCE/{loss,step}.csv`` not already there."""
    for source in sources:
        for name in ("loss.csv", "step.csv"):
            path, target = Path(source) / name, Path(results) / name
            if not path.exists():
                continue
            have = {tuple(r.values()) for r in common.read_rows(target)} if target.exists() else set()
            new = [r for r in common.read_rows(path) if tuple(r.values()) not in have]
            if new:
                common.append_rows(target, new)
            print(f"{path}: {len(new)} new rows appended to {target}")


def load(results: Path, name: str) -> list[dict]:
    path = results / name
    return latest(common.read_rows(path)) if path.exists() else []


def pick_device(rows: list[dict], device: str | None) -> list[dict]:
    if not rows:
        return rows
    chosen = device or max(rows, key=lambda r: r["timestamp"])["device"]
    return [r for r in rows if r["device"] == chosen]


def _num(value: str) -> float:
    return float(value) if value not in ("", None) else float("nan")


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write the PNG atomically (temp file in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=110, bbox_inches="tight")
    Path(tmp.name).replace(path)
    return path


def _title(device: str) -> str:
    return device + ("  [CPU: harness check, not kernel results]" if common.is_cpu_device(device) else "")


def plot_loss_time(rows: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    timed = [r for r in rows if r["kernel"] == "sfr_loss" and r["metric"] == "time"]
    groups = defaultdict(list)
    for r in timed:
        groups[(common.preset_name(int(r["D"]), int(r["E"])), r["dtype"])].append(r)
    written = []
    for (preset, dtype), group in sorted(groups.items()):
        modes = [m for m in common.MODES if any(r["mode"] == m for r in group)]
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            lines = defaultdict(list)
            for r in group:
                if r["mode"] == mode:
                    lines[(r["provider"], r["M"])].append(r)
            for (provider, m), points in sorted(lines.items()):
                points.sort(key=lambda r: int(r["N"]))
                n = [int(r["N"]) for r in points]
                p50 = [_num(r["p50"]) for r in points]
                err = [[p - _num(r["p20"]) for p, r in zip(p50, points)], [_num(r["p80"]) - p for p, r in zip(p50, points)]]
                ax.errorbar(n, p50, yerr=err, marker="o", capsize=3, label=f"{provider} M={m}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (anchors)")
            ax.set_ylabel("time (ms, median)")
            ax.set_title(mode)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"SFR loss {preset} ({dtype}) - {_title(group[0]['device'])}", fontsize=9)
        written.append(_save(fig, out / f"loss_time_{preset}_{dtype}.png"))
        plt.close(fig)
    return written


def _bar_plot(rows: list[dict], metric: str, ylabel: str, title: str, path: Path) -> Path | None:
    plt = _pyplot()
    chosen = [r for r in rows if r["kernel"] == "sfr_loss" and r["metric"] == metric and r["mode"] == "full"]
    if not chosen:
        return None
    shapes = sorted({(common.preset_name(int(r["D"]), int(r["E"])), int(r["N"]), int(r["M"])) for r in chosen})
    providers = sorted({r["provider"] for r in chosen})
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(shapes) * len(providers) / 2), 4.5))
    for i, provider in enumerate(providers):
        values = []
        for preset, n, m in shapes:
            match = [r for r in chosen if r["provider"] == provider and int(r["N"]) == n and int(r["M"]) == m
                     and common.preset_name(int(r["D"]), int(r["E"])) == preset]
            values.append(_num(match[-1]["p50"]) if match else float("nan"))
        ax.bar([x + i * width for x in range(len(shapes))], values, width=width, label=provider)
    ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(shapes))])
    ax.set_xticklabels([f"{p}\nN={n} M={m}" for p, n, m in shapes], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title} (mode full, {chosen[0]['dtype']}) - {_title(chosen[0]['device'])}", fontsize=9)
    written = _save(fig, path)
    plt.close(fig)
    return written


def plot_step(rows: list[dict], out: Path) -> Path | None:
    plt = _pyplot()
    overhead = [r for r in rows if r["kernel"] == "step" and r["metric"] in ("time_overhead", "memory_overhead")]
    if not overhead:
        return None
    configs = sorted({(int(r["D"]), int(r["N"]), r["provider"]) for r in overhead})
    metrics = [m for m in ("time_overhead", "memory_overhead") if any(r["metric"] == m for r in overhead)]
    bar = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(5, 2.5 * len(configs)), 4))
    for i, metric in enumerate(metrics):
        values = []
        for d, n, provider in configs:
            match = [r for r in overhead if r["metric"] == metric and int(r["D"]) == d and int(r["N"]) == n
                     and r["provider"] == provider]
            values.append(_num(match[-1]["p50"]) if match else float("nan"))
        ax.bar([x + i * bar for x in range(len(configs))], values, width=bar, label=metric.replace("_", " "))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([x + bar * (len(metrics) - 1) / 2 for x in range(len(configs))])
    ax.set_xticklabels([f"{_model_name(d)}\n{n} tokens\n{p}" for d, n, p in configs], fontsize=7)
    ax.set_ylabel("SFT+SFR over SFT (%)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"end-to-end SFR overhead - {_title(overhead[0]['device'])}", fontsize=9)
    written = _save(fig, out / "step_overhead.png")
    plt.close(fig)
    return written


def _model_name(d: int) -> str:
    from bench.step import MODEL_CONFIGS

    names = [name for name, cfg in MODEL_CONFIGS.items() if cfg["hidden_size"] == d]
    return names[0] if names else f"D={d}"


# ----------------------------------------------------------------------------------------------
# Headline table
# ----------------------------------------------------------------------------------------------

X = "{:.2f}×"


def _fmt(value: float, pattern: str = "{:.2f}") -> str:
    return "—" if value != value else pattern.format(value)  # NaN -> dash


def headline_numbers(loss_rows: list[dict], step_rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per-shape comparison (mode full) and per-model step overhead, from (already filtered) rows.

    Where a provider was measured in several variants (``torch-compile:<mode>``), the fastest one
    stands for it: its time, memory and roofline.
    """
    variants = defaultdict(lambda: defaultdict(dict))  # shape -> provider label -> metric -> p50
    for r in loss_rows:
        if r["kernel"] == "sfr_loss" and r["mode"] == "full" and r["metric"] in ("time", "memory", "roofline_pct"):
            shape = (common.preset_name(int(r["D"]), int(r["E"])), int(r["N"]), int(r["M"]), r["dtype"], r["device"])
            variants[shape][r["provider"]][r["metric"]] = _num(r["p50"])
    by_shape = {}
    for shape, labels in variants.items():
        fastest = {}  # provider -> its fastest label
        for label, metrics in labels.items():
            base, time_ = provider_base(label), metrics.get("time", float("inf"))
            if base not in fastest or time_ < labels[fastest[base]].get("time", float("inf")):
                fastest[base] = label
        by_shape[shape] = {(base, metric): value for base, label in fastest.items()
                           for metric, value in labels[label].items()}
    shapes = []
    for (preset, n, m, dtype, device), v in sorted(by_shape.items()):
        def get(provider, metric, v=v):
            return v.get((provider, metric), float("nan"))

        shapes.append(dict(
            preset=preset, N=n, M=m, dtype=dtype, device=device,
            eager_ms=get("torch-eager", "time"), compile_ms=get("torch-compile", "time"), triton_ms=get("triton", "time"),
            speedup_eager=get("torch-eager", "time") / get("triton", "time"),
            speedup_compile=get("torch-compile", "time") / get("triton", "time"),
            memory_eager=get("triton", "memory") / get("torch-eager", "memory"),
            memory_compile=get("triton", "memory") / get("torch-compile", "memory"),
            roofline=get("triton", "roofline_pct")))
    by_model = defaultdict(dict)
    for r in step_rows:
        if r["kernel"] == "step":
            by_model[(int(r["D"]), int(r["N"]), r["provider"], r["dtype"], r["device"])][(r["mode"], r["metric"])] = _num(r["p50"])
    steps = []
    for (d, n, provider, dtype, device), v in sorted(by_model.items()):
        steps.append(dict(model=_model_name(d), D=d, tokens=n, provider=provider, dtype=dtype, device=device,
                          sft_ms=v.get(("sft", "time"), float("nan")), sfr_ms=v.get(("sft+sfr", "time"), float("nan")),
                          step_time=v.get(("sft+sfr", "time_overhead"), float("nan")),
                          sft_mb=v.get(("sft", "memory"), float("nan")), sfr_mb=v.get(("sft+sfr", "memory"), float("nan")),
                          step_memory=v.get(("sft+sfr", "memory_overhead"), float("nan"))))
    return shapes, steps


def headline_markdown(loss_rows: list[dict], step_rows: list[dict], allow_cpu: bool = False) -> str:
    """The headline tables (markdown). Without ``allow_cpu`` CPU rows are dropped."""
    if not allow_cpu:
        loss_rows = [r for r in loss_rows if not common.is_cpu_device(r["device"])]
        step_rows = [r for r in step_rows if not common.is_cpu_device(r["device"])]
    shapes, steps = headline_numbers(loss_rows, step_rows)
    devices = sorted({s["device"] for s in shapes} | {s["device"] for s in steps})
    lines = []
    if not devices:
        lines.append("**No GPU results yet.** The tables below show the layout; the commands above fill them.")
    elif any(common.is_cpu_device(d) for d in devices):
        lines.append("**CPU harness check — these are NOT kernel results** (fp32 reference on a CPU).")
    lines.append(f"Device: {', '.join(devices) if devices else '— (none yet)'}.")
    commits = sorted({r["commit"] for r in loss_rows + step_rows})
    if commits:
        lines.append(f"Commit(s): {', '.join(commits)}.")
    lines += ["", "SFR loss, mode full (forward + backward), median time; ratios are triton vs the other provider "
              "(speed-up = other / triton time; memory = triton / other peak memory of the op); torch-compile is "
              "its fastest mode measured (the provider column of loss.csv names it).", "",
              "| shape | N | M | dtype | eager ms | compile ms | triton ms | speed-up vs eager | speed-up vs compile "
              "| memory vs eager | memory vs compile | triton % roofline |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in shapes:
        lines.append(f"| {s['preset']} | {s['N']} | {s['M']} | {s['dtype']} | {_fmt(s['eager_ms'], '{:.3f}')} | "
                     f"{_fmt(s['compile_ms'], '{:.3f}')} | {_fmt(s['triton_ms'], '{:.3f}')} | {_fmt(s['speedup_eager'], X)} | "
                     f"{_fmt(s['speedup_compile'], X)} | {_fmt(s['memory_eager'], X)} | {_fmt(s['memory_compile'], X)} | "
                     f"{_fmt(s['roofline'], '{:.1f}%')} |")
    if not shapes:
        lines.append("| — | — | — | — | — | — | — | — | — | — | — | — |")
    lines += ["", "End-to-end optimizer step (forward + backward + AdamW), SFT vs SFT+SFR, same batch:", "",
              "| model | tokens/step | attention+CE | dtype | SFT ms | SFT+SFR ms | time overhead | SFT peak MB "
              "| SFT+SFR peak MB | memory overhead |",
              "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in steps:
        lines.append(f"| {s['model']} | {s['tokens']} | {s['provider']} | {s['dtype']} | {_fmt(s['sft_ms'])} | "
                     f"{_fmt(s['sfr_ms'])} | {_fmt(s['step_time'], '{:+.2f}%')} | {_fmt(s['sft_mb'], '{:.0f}')} | "
                     f"{_fmt(s['sfr_mb'], '{:.0f}')} | {_fmt(s['step_memory'], '{:+.2f}%')} |")
    if not steps:
        lines.append("| — | — | — | — | — | — | — | — | — | — |")

    head = [s for s in shapes if (s["preset"], s["N"], s["M"]) == (HEADLINE["preset"], HEADLINE["N"], HEADLINE["M"])]
    step = [s for s in steps if s["D"] == STEP_HEADLINE_D]
    measured = dict(head[-1]) if head else {}
    if step:
        measured.update(step_time=step[-1]["step_time"], step_memory=step[-1]["step_memory"])
    lines += ["", f"Targets ({HEADLINE['preset']}, N={HEADLINE['N']}, M={HEADLINE['M']}, bf16, full; "
              "step: qwen2.5-1.5b):", "", "| target | goal | measured | met |", "|---|---|---:|---|"]
    for label, key, op, threshold in TARGETS:
        value = measured.get(key, float("nan"))
        unit = "%" if key in ("roofline", "step_time", "step_memory") else "×"
        met = "—" if value != value else ("yes" if (value >= threshold if op == ">=" else value <= threshold) else "no")
        lines.append(f"| {label} | {op} {threshold:g}{unit} | {_fmt(value)}{unit if value == value else ''} | {met} |")
    return "\n".join(lines) + "\n"


def update_results_file(path: Path, table: str) -> None:
    """Replace the text between the headline markers of ``path`` (atomically)."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {MARK_START} ... {MARK_END} section to replace")
    new = pattern.sub(lambda _: f"{MARK_START}\n{table}{MARK_END}", text)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as tmp:
        tmp.write(new)
    Path(tmp.name).replace(path)


def main(args: argparse.Namespace) -> int:
    results, out = args.results, args.out or args.results
    try:
        add_results(results, args.add)
        loss_rows, step_rows = load(results, "loss.csv"), load(results, "step.csv")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not loss_rows and not step_rows:
        print(f"error: no loss.csv or step.csv under {results}", file=sys.stderr)
        return 2
    if args.update_results and args.allow_cpu:
        print("error: --update-results never takes CPU rows; drop --allow-cpu", file=sys.stderr)
        return 2
    written = []
    loss_dev, step_dev = pick_device(loss_rows, args.device), pick_device(step_rows, args.device)
    if loss_dev:
        dtypes = sorted({r["dtype"] for r in loss_dev if r["kernel"] == "sfr_loss"})
        written += plot_loss_time(loss_dev, out)
        for dtype in dtypes:
            same = [r for r in loss_dev if r["dtype"] == dtype]
            for metric, ylabel, title in (("memory", "MB added by the op (peak)", "SFR loss peak memory"),
                                          ("roofline_pct", "% of roofline", "SFR loss % of roofline")):
                name = "loss_memory" if metric == "memory" else "loss_roofline"
                path = _bar_plot(same, metric, ylabel, title, out / f"{name}_{dtype}.png")
                if path:
                    written.append(path)
                elif metric == "memory":
                    print(f"no memory rows for {dtype} (not measured on the CPU): no memory plot")
    step_plot = plot_step(step_dev, out)
    if step_plot:
        written.append(step_plot)
    for path in written:
        print(f"wrote {path}")
    if args.table or args.update_results:
        table = headline_markdown(loss_rows, step_rows, allow_cpu=args.allow_cpu)
        print(table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "headline.md").write_text(table, encoding="utf-8")
        print(f"wrote {out / 'headline.md'}")
        if args.update_results:
            update_results_file(args.update_results, table)
            print(f"updated {args.update_results}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
