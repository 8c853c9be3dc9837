"""sfr.eval.report: table cells, Markdown tables, bar plots, atomic writing, the code report, training curves."""
import json
import math

import numpy as np
import pytest

from sfr.eval.report import (
    bar_plots,
    format_value,
    markdown_table,
    plot_losses,
    write_code_report,
    write_outputs,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_format_value():
    assert format_value(None) == "n/a" and format_value(float("nan")) == "n/a"
    assert format_value(0.123456) == "0.1235" and format_value(0.123456, 3) == "0.123"
    assert format_value(np.float32(2.5)) == "2.5"  # numpy numbers too
    assert format_value(12345.678) == "12345.7"  # one decimal from 1000 on
    assert format_value(7) == "7" and format_value(123456) == "123456"  # integers as they are
    assert format_value("sdpa") == "sdpa"


def test_markdown_table_has_one_row_per_model_and_marks_missing_values():
    rows = {"runs/sft": {"a": 0.5, "b": None}, "runs/sfr": {"a": 2 / 3, "b": 10}}
    table = markdown_table(rows, [("a", "metric a"), ("b", "metric b")], first_header="run")
    assert table.splitlines() == ["| run | metric a | metric b |", "|---|---:|---:|",
                                  "| runs/sft | 0.5 | n/a |", "| runs/sfr | 0.6667 | 10 |"]


def test_bar_plots_write_a_png_of_the_metrics_that_have_values(tmp_path):
    rows = {"sft": {"a": 0.2, "b": None}, "sfr": {"a": 0.4, "b": float("nan")}}
    path = bar_plots(rows, [("a", "A"), ("b", "B")], tmp_path / "bars.png", "title")
    assert path == tmp_path / "bars.png" and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000
    assert bar_plots(rows, [("b", "B")], tmp_path / "none.png", "title") is None  # no value at all: no plot
    assert not (tmp_path / "none.png").exists()


def test_bar_plots_draw_the_given_intervals_as_error_bars(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn, bar = [], matplotlib.axes.Axes.bar

    def recording_bar(self, x, height, *args, **kwargs):
        drawn.append((list(height), kwargs.get("yerr")))
        return bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    rows = {"sft": {"a": 0.5}, "sfr": {"a": 0.6}, "corpus": {"a": 0.9}}
    errors = {"sft": {"a": (0.25, 0.75)}, "sfr": {"a": (0.5, 0.65)}}  # the corpus has no interval
    assert bar_plots(rows, [("a", "A")], tmp_path / "e.png", "t", errors, "error bars: a note").is_file()
    heights, yerr = drawn[0]
    assert heights == [0.5, 0.6, 0.9]
    assert yerr[0][:2] == pytest.approx([0.25, 0.1]) and yerr[1][:2] == pytest.approx([0.25, 0.05])
    assert math.isnan(yerr[0][2]) and math.isnan(yerr[1][2])  # no interval, no error bar


def test_write_outputs_writes_json_text_and_plots_and_leaves_no_staging(tmp_path):
    out = tmp_path / "out"
    written = write_outputs(out, {"results.json": {"x": 1.5}, "report.md": "# hi\n"},
                            [("plot.png", {"m": {"a": 1.0}}, [("a", "A")], "t"),
                             ("empty.png", {"m": {"a": None}}, [("a", "A")], "t")])
    assert written == {name: str(out / name) for name in ("results.json", "report.md", "plot.png")}
    assert json.loads((out / "results.json").read_text()) == {"x": 1.5}
    assert (out / "report.md").read_text() == "# hi\n" and (out / "plot.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "report.md", "results.json"]  # no .sfr-eval-*


def test_code_report_of_two_models(tmp_path):
    def result(p1, p5):
        return {"pass_at_k": {"pass@1": p1, "pass@5": p5}, "data": "HumanEval.jsonl", "num_problems": 3, "n": 5,
                "temperature": 0.8, "style": "completion", "sandbox": "rlimit", "timeout": 3.0}

    written = write_code_report({"a": result(0.2, 0.6), "b": result(1 / 3, 0.8)}, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| model | pass@1 | pass@5 |" in report and "| b | 0.3333 | 0.8 |" in report
    assert "3 problems, n = 5 samples each" in report and "`rlimit` sandbox with a 3.0 s timeout" in report
    assert json.loads((tmp_path / "results.json").read_text())["a"]["pass_at_k"]["pass@5"] == 0.6
    assert set(written) == {"results.json", "report.md", "pass_at_k.png"}
    single = write_code_report({**result(0.5, 1.0), "model": "only"}, tmp_path / "one")  # one model's results
    assert "| only | 0.5 | 1 |" in (tmp_path / "one" / "report.md").read_text() and "pass_at_k.png" in single


def test_plot_losses_draws_both_runs_and_the_sfr_terms(tmp_path):
    sft = [{"step": s, "loss": 3.0 - 0.1 * s, "ce_loss": 3.0 - 0.1 * s} for s in range(1, 6)]
    sfr = [{"step": s, "loss": 4.0 - 0.1 * s, "ce_loss": 3.1 - 0.1 * s, "sfr_loss": 1.0 - 0.05 * s,
            "sfr_lambda": min(1.0, s / 4)} for s in range(1, 6)]
    sfr.append({"step": 5, "train_runtime": 1.0, "loss": math.nan})  # the Trainer's summary row
    path = plot_losses({"SFT": sft, "SFR": sfr}, tmp_path / "loss.png")
    assert path == tmp_path / "loss.png" and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    # an SFT-only history (no flow loss) still gives the figure
    assert plot_losses({"SFT": sft}, tmp_path / "sft.png").read_bytes()[:8] == PNG
