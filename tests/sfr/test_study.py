"""``sfr study --quick`` end to end through its API: files, the results' structure, and that the summary is
what the runs measured (means and t intervals across seeds, seed-paired differences to SFT)."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from sfr.cli import main as cli_main
from sfr.study import CALIBRATION_CELLS, FULL, QUICK, STUDY_METRICS, run_cell, run_study, study_settings

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    cache, out = tmp_path_factory.mktemp("sfr-cache"), tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFR_CACHE", str(cache))  # the base stage and the prepared data are cached here
        result = run_study(out, study_settings(quick=True), progress=False, quiet=True)
        yield {"out": out, "result": result, "saved": json.loads((out / "results.json").read_text())}


def test_writes_results_report_and_plots(study):
    out, saved = study["out"], study["saved"]
    for name in ("results.json", "report.md", "metrics.png", "vs_sft.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "smoke test" in report and "95 % t interval" in report and "](vs_sft.png)" in report
    assert "process-minutes as recorded by each run." in report  # nothing reused in a fresh study
    runs = saved["runs"]
    assert {(r["objective"], r["seed"]) for r in runs} == {(o, s) for o in ("sft", "sfr", "mtp") for s in QUICK.seeds}
    for run in runs:
        assert set(run) >= {"objective", "seed", "settings", "metrics"} and set(run["metrics"]) == set(STUDY_METRICS)
        assert run["settings"]["seed"] == run["seed"] and run["settings"]["steps"] == QUICK.steps
        assert (out / "runs" / f"{run['cell']}-s{run['seed']}" / "run.json").is_file()
        # the metrics are the means of the per-question / per-pair values saved with them
        xs = run["cross_style"]
        assert xs["styles"] == [9] * QUICK.prompts
        assert run["metrics"]["cross_style_similarity"] == pytest.approx(np.mean(xs["cross_style_similarity"]))
        assert run["metrics"]["mode_entropy"] == pytest.approx(np.mean(run["per_pair"]["mode_entropy"]))
        assert len(run["per_pair"]["pairs"]) == 9 * QUICK.prompts
    assert set(saved["references"]) == {"corpus", "base"}
    # the corpus' own replies are all well-formed and in style
    assert saved["references"]["corpus"]["metrics"]["valid_reply_rate"] == 1.0
    assert saved["references"]["corpus"]["metrics"]["style_marker_rate"] == 1.0


def test_summary_is_the_mean_and_t_interval_across_seeds_and_the_paired_difference(study):
    saved = study["saved"]
    summary, runs = saved["summary"], saved["runs"]
    assert summary["rows"] == ["sft", "sfr", "mtp"]
    for name in summary["rows"]:
        for metric in STUDY_METRICS:
            values = [r["metrics"][metric] for r in runs if r["name"] == name and r["metrics"][metric] is not None]
            cell = summary["cells"][name][metric]
            if not values:
                assert cell["mean"] is None
                continue
            assert cell["n"] == len(values) == 2 and cell["mean"] == pytest.approx(np.mean(values))
            half = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / math.sqrt(2)
            assert cell["half_width"] == pytest.approx(half, abs=1e-12)
    sft = {r["seed"]: r["metrics"] for r in runs if r["name"] == "sft"}
    for name in ("sfr", "mtp"):
        for metric in ("cross_style_similarity", "mode_entropy", "heldout_nll"):
            diffs = [r["metrics"][metric] - sft[r["seed"]][metric] for r in runs if r["name"] == name]
            paired = summary["vs_sft"][name][metric]
            assert paired["mean"] == pytest.approx(np.mean(diffs))
            assert paired["excludes_zero"] == (abs(paired["mean"]) > paired["half_width"])
    assert "sft" not in summary["vs_sft"]
    assert summary["references"]["base"] == saved["references"]["base"]["metrics"]
    report = (study["out"] / "report.md").read_text()
    nll = summary["cells"]["sfr"]["heldout_nll"]
    assert f"{nll['mean']:.3g} ± {nll['half_width']:.2g}" in report  # the table shows the summary's numbers


def test_a_finished_run_is_reused_not_retrained(study, monkeypatch):
    import sfr.train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sfr.train, "train", no_training)
    settings = study_settings(quick=True)
    cell = settings.cells[1]
    out = study["out"] / "runs" / f"{cell.name}-s0"
    rows = run_cell(settings, cell, 0, "unused-base", "unused-data", out)
    assert all(row.pop("reused") is True for row in rows)  # marked, so the report counts it apart
    assert rows == [r for r in study["saved"]["runs"] if r["cell"] == cell.name and r["seed"] == 0]


def test_settings_and_command_line_errors(capsys, tmp_path):
    with pytest.raises(ValueError, match="seeds"):
        study_settings(seeds=(1, 1))
    with pytest.raises(ValueError, match="prompts"):
        study_settings(prompts=11)
    with pytest.raises(ValueError, match="samples"):
        study_settings(samples=1)
    assert cli_main(["study", "--seeds", "0", "--output-dir", str(tmp_path / "s")]) == 2
    assert "sfr study: error: --seeds must be >= 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli_main(["study", "--output-dir", str(tmp_path / "file")]) == 2
    assert "is an existing file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["study", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--output-dir", "--quick", "--seeds", "--grid", "--jobs", "--quiet"):
        assert flag in help_text


def test_calibration_grid_changes_one_setting_per_cell_against_the_default_objective():
    from sfr.training_args import SFRTrainingArguments

    settings = study_settings(grid="calibration", seeds=(0, 1, 2))
    assert settings.cells == CALIBRATION_CELLS and settings.seeds == (0, 1, 2) and settings.steps == FULL.steps
    assert settings.cells[0] == FULL.cells[0]  # the same SFT cell as the objectives study, so its runs are shared
    names = [cell.name for cell in settings.cells]
    assert len(set(names)) == len(names)
    for cell in settings.cells[1:]:
        assert cell.objective == "sfr" and cell.overrides
        # every override is a real SFRTrainingArguments field that the run's arguments take as given
        args = SFRTrainingArguments.for_embedded_default(output_dir="unused", max_steps=FULL.steps, **cell.overrides)
        for key, value in cell.overrides.items():
            assert getattr(args, key) == (str(value) if key == "target_scale" else value), (cell.name, key)
    assert study_settings(quick=True, grid="objectives").cells == QUICK.cells  # --quick keeps its three cells
    with pytest.raises(ValueError, match="grid must be one of"):
        study_settings(grid="everything")
