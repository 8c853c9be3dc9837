"""bench/run_gpu.py's orchestration, on the CPU: stage order, per-stage limits, the global deadline, rows
written as they come. (The stages themselves need a GPU; here they are small Python programs.)"""
import argparse
import sys
import time

from bench import run_gpu
from bench.run_gpu import Stage, run_stages

APPEND = "import pathlib, sys; p = pathlib.Path(sys.argv[1]) / 'rows.txt'; p.write_text((p.read_text() if p.exists() else '') + sys.argv[2] + '\\n')"


def _stage(name, code, timeout=30, min_s=0):
    return Stage(name, f"test stage {name}", ("-c", f"{APPEND}\n{code}", "{out}", name), timeout, min_s)


def test_stages_run_in_order_with_their_limits_and_keep_what_they_wrote(tmp_path):
    child = tmp_path / "child.pid"
    stages = [
        _stage("a", ""),
        # b starts a grandchild, then hangs: its limit kills the whole process group, after its row was written
        _stage("b", f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
                    f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)", timeout=2),
        _stage("c", "raise SystemExit(3)"),
        _stage("d", "", min_s=10_000),  # needs more than the whole budget: skipped, the next ones still run
        _stage("e", ""),
    ]
    started = time.monotonic()
    outcomes = run_stages(stages, tmp_path, budget_s=60, log=lambda message: None)
    assert time.monotonic() - started < 20
    assert [o.stage for o in outcomes] == ["a", "b", "c", "d", "e"]
    assert [o.status.split(" ")[0] for o in outcomes] == ["ok", "timeout", "failed", "skipped", "ok"]
    assert outcomes[2].status == "failed (exit 3)" and 1.5 < outcomes[1].seconds < 10
    assert (tmp_path / "rows.txt").read_text().split() == ["a", "b", "c", "e"]
    time.sleep(0.2)
    assert not _running(int(child.read_text()))  # the grandchild died with its stage
    status = (tmp_path / "run_gpu.md").read_text()
    assert "| b | timeout |" in status and "| d | skipped" in status and "| e | ok |" in status


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopts it to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_global_deadline_cuts_a_running_stage_and_skips_the_rest(tmp_path):
    stages = [_stage("slow", "import time; time.sleep(60)", timeout=60), _stage("next", "", min_s=1)]
    started = time.monotonic()
    outcomes = run_stages(stages, tmp_path, budget_s=3, log=lambda message: None)
    assert time.monotonic() - started < 10
    assert [o.status.split(" ")[0] for o in outcomes] == ["timeout", "skipped"]
    assert (tmp_path / "rows.txt").read_text().split() == ["slow"]


def test_the_status_file_is_written_after_every_stage(tmp_path):
    """A stage sees the status of the stages before it: what a command stopped from outside would leave."""
    code = "import pathlib, sys; print(pathlib.Path(sys.argv[1], 'run_gpu.md').read_text()); sys.exit(0 if '| first | ok |' in pathlib.Path(sys.argv[1], 'run_gpu.md').read_text() else 5)"
    stages = [_stage("first", ""), _stage("second", code)]
    outcomes = run_stages(stages, tmp_path, budget_s=60, log=lambda message: None)
    assert [o.status for o in outcomes] == ["ok", "ok"]


def _parser_of(stage: Stage) -> argparse.ArgumentParser:
    if stage.args[0] == "bench/check_gpu.py":
        from bench.check_gpu import build_parser

        return build_parser()
    module = stage.args[1]
    parser = argparse.ArgumentParser()
    if module == "bench.loss":
        from bench.loss import add_arguments
    else:
        assert module == "bench.step", stage
        from bench.step import add_arguments
    add_arguments(parser)
    return parser


def test_the_default_run_fits_seven_minutes_in_order_of_value(tmp_path):
    defaults = [s for s in run_gpu.STAGES if s.default]
    assert [s.name for s in defaults[:3]] == ["check", "headline", "step"]  # correctness, headline row, end to end
    assert run_gpu.DEFAULT_BUDGET_MINUTES <= 7
    assert all(s.min_s <= s.timeout_s for s in run_gpu.STAGES)
    for stage in run_gpu.STAGES:  # every stage's command line is accepted by the program it runs
        args = [a.replace("{out}", str(tmp_path)) for a in stage.args]
        _parser_of(stage).parse_args(args[1:] if args[0] == "bench/check_gpu.py" else args[2:])


def test_unknown_stage_and_missing_gpu_are_one_line_errors(capsys):
    assert run_gpu.main(["lost"]) == 2
    assert "unknown stage 'lost'" in capsys.readouterr().err
    if "torch" in sys.modules and not sys.modules["torch"].cuda.is_available():
        assert run_gpu.main([]) == 1
        assert "need a CUDA device" in capsys.readouterr().err
