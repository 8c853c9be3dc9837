"""The code sandbox against hostile programs, in every sandbox mode this machine can run.

bwrap mode must contain everything; rlimit mode is documented as weaker (no file-system isolation, and
no network isolation where it cannot create a network namespace; when it runs programs as this very
user it cannot protect this user's files or processes), and those cases are skipped with the reason.
"""
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from sfr.eval import check_program, sandbox
from sfr.eval.sandbox import (
    SandboxLimits,
    sandbox_available,
    sandbox_isolates_network,
    sandbox_mode,
    sandbox_runs_as_other_user,
)

TIMEOUT = 1.5
SLACK = 3.0  # start-up and teardown of the sandbox on a busy 2-core machine


def _modes():
    params = []
    for mode in ("bwrap", "rlimit"):
        reason = None if sandbox_available(mode) else f"{mode} sandbox is not usable on this machine"
        if mode == "bwrap" and reason:
            reason += " (apt-get install -y bubblewrap; needs unprivileged user namespaces)"
        params.append(pytest.param(mode, marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return params


pytestmark = [pytest.mark.filterwarnings("ignore:sandbox:RuntimeWarning")]


def _leftover_runners() -> list[int]:
    """Processes still running the sandbox runner (they would be escaped sandbox processes)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if b"_sfr_run" in f.read():
                        pids.append(int(name))
            except OSError:
                pass
    return pids


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])  # field 4, after the (comm) that may hold spaces
    except (OSError, IndexError, ValueError):
        return 0


def _runners_under(root: int) -> list[int]:
    """Runner processes descending from ``root`` (not another test's runners that are still dying)."""
    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = _parent(pid)
        return False

    return [pid for pid in _leftover_runners() if descends(pid)]


def _assert_no_leftovers():
    deadline = time.monotonic() + 2.0
    while _leftover_runners() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leftover_runners() == []


def _run(program, mode, **limit_overrides):
    limits = SandboxLimits(**limit_overrides) if limit_overrides else None
    start = time.monotonic()
    result = check_program(program, timeout=TIMEOUT, mode=mode, limits=limits)
    return result, time.monotonic() - start


def _skip_unless_isolated_from_this_user(mode):
    if mode == "rlimit" and not sandbox_runs_as_other_user(mode):
        pytest.skip("rlimit mode runs programs as this user (not root here), so it cannot protect this "
                    "user's files and processes: known weaker isolation")


@pytest.mark.parametrize("mode", _modes())
def test_ordinary_programs_pass_fail_and_use_scratch(mode):
    result, _ = _run("with open('scratch.txt', 'w') as f:\n    f.write('ok')\n"
                     "assert open('scratch.txt').read() == 'ok'\nprint('done')\n", mode)
    assert result.status == "passed" and result.passed and result.returncode == 0
    assert result.stdout.strip() == "done" and result.sandbox == mode
    failed, _ = _run("def f(x):\n    return x + 1\nassert f(1) == 3\n", mode)
    assert failed.status == "failed" and not failed.passed and "AssertionError" in failed.stderr
    broken, _ = _run("def f(:\n", mode)
    assert broken.status == "error" and "SyntaxError" in broken.reason
    crashed, _ = _run("raise KeyError('boom')\n", mode)
    assert crashed.status == "error" and "KeyError" in crashed.reason
    # a program that swaps out sys.stdout (as tests capturing output do) still passes when it finishes
    swapped, _ = _run("import io, sys\nsys.stdout = io.StringIO()\nprint('hidden')\nassert True\n", mode)
    assert swapped.passed, swapped


@pytest.mark.parametrize("mode", _modes())
@pytest.mark.parametrize("early_exit", ["exit(0)", "import sys; sys.exit(0)", "import os; os._exit(0)",
                                        "raise SystemExit"])
def test_exiting_early_is_a_failure(mode, early_exit):
    result, _ = _run(f"{early_exit}\nassert 1 == 2, 'never reached'\n", mode)
    assert result.returncode == 0 and result.status == "failed" and not result.passed


@pytest.mark.parametrize("mode", _modes())
@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(3600)\n"])
def test_infinite_loop_times_out(mode, program):
    result, elapsed = _run(program, mode)
    assert result.status == "timeout" and not result.passed and "still running" in result.reason
    assert TIMEOUT <= elapsed < TIMEOUT + SLACK
    _assert_no_leftovers()


@pytest.mark.parametrize("mode", _modes())
def test_sleeping_children_and_escaped_sessions_are_killed(mode):
    # a double-forked, setsid'ed child outlives its parent unless the sandbox reaps it
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               "        time.sleep(60)\n    os._exit(0)\nos.wait()\nprint('parent done')\n")
    result, elapsed = _run(program, mode)
    assert result.passed and elapsed < TIMEOUT + SLACK
    _assert_no_leftovers()


@pytest.mark.parametrize("mode", _modes())
def test_fork_bomb_is_contained(mode):
    program = ("import os, time\nwhile True:\n    try:\n        os.fork()\n"
               "    except OSError:\n        time.sleep(0.01)\n")
    result, elapsed = _run(program, mode, max_processes=16)
    assert not result.passed and elapsed < TIMEOUT + SLACK
    _assert_no_leftovers()
    assert subprocess.run(["true"], timeout=5).returncode == 0  # the host can still start processes


@pytest.mark.parametrize("mode", _modes())
def test_memory_bomb_is_contained(mode):
    program = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n"
    result, elapsed = _run(program, mode, memory_bytes=256 << 20)
    assert result.status == "error" and "MemoryError" in result.reason
    assert elapsed < TIMEOUT + SLACK
    huge, _ = _run("x = bytearray(1 << 40)\n", mode)
    assert huge.status == "error" and "MemoryError" in huge.reason


@pytest.fixture(params=["tmp", "outside-tmp"])
def host_dir(request, tmp_path):
    """A host directory the program knows the path of: under /tmp, and outside /tmp (next to this test
    file), so that a private /tmp alone cannot make the test pass. World-readable, owned by us."""
    if request.param == "tmp":
        folder = tmp_path / "host"
        folder.mkdir()
    else:
        folder = Path(__file__).resolve().parent / f".sandbox-host-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("mode", _modes())
def test_cannot_write_or_delete_host_files(mode, host_dir):
    _skip_unless_isolated_from_this_user(mode)
    keep = host_dir / "keep.txt"
    keep.write_text("precious")
    os.chmod(keep, 0o644)
    target = host_dir / "pwned.txt"
    program = (f"import os, shutil\ntry:\n    open({str(target)!r}, 'w').write('pwned')\nexcept OSError as e:\n"
               f"    print('write blocked', type(e).__name__)\n"
               f"try:\n    open({str(keep)!r}, 'a').write('pwned')\nexcept OSError as e:\n"
               f"    print('append blocked', type(e).__name__)\n"
               f"for attempt in (lambda: os.remove({str(keep)!r}), lambda: shutil.rmtree({str(host_dir)!r}),\n"
               f"                lambda: os.rename({str(keep)!r}, 'stolen.txt')):\n"
               f"    try:\n        attempt()\n    except OSError as e:\n"
               f"        print('delete blocked', type(e).__name__)\n"
               f"print('end')\n")
    result, _ = _run(program, mode)
    assert result.passed, result  # the program ran to its end; every attempt was refused
    assert result.stdout.count("blocked") == 5 and result.stdout.rstrip().endswith("end")
    assert not target.exists()
    assert keep.read_text() == "precious"  # still there, unchanged
    assert sorted(p.name for p in host_dir.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("mode", _modes())
def test_read_only_root_and_private_tmp(mode):
    if mode == "rlimit":
        pytest.skip("rlimit mode has no file-system isolation (known weaker; use bwrap)")
    marker = Path("/tmp") / f"sfr-host-marker-{uuid.uuid4().hex}"
    marker.write_text("host")
    try:
        program = (f"import os\nprint('sees host tmp', os.path.exists({str(marker)!r}))\n"
                   "for path in ('/usr/sfr-pwned', '/etc/sfr-pwned', '/root/sfr-pwned', '/var/tmp/sfr-pwned',\n"
                   "             '/sfr-pwned'):\n"
                   "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
                   "    except OSError as e:\n        print('blocked', path, type(e).__name__)\n"
                   "open('/tmp/own.txt', 'w').write('scratch is writable')\nprint(open('/tmp/own.txt').read())\n")
        result, _ = _run(program, mode)
        assert result.passed, result
        assert "sees host tmp False" in result.stdout and "wrote /" not in result.stdout
        assert result.stdout.count("blocked") == 5 and "scratch is writable" in result.stdout
        assert not any(Path(p).exists() for p in ("/usr/sfr-pwned", "/etc/sfr-pwned", "/root/sfr-pwned",
                                                  "/var/tmp/sfr-pwned", "/sfr-pwned"))
        assert not Path("/tmp/own.txt").exists() or Path("/tmp/own.txt").read_text() != "scratch is writable"
    finally:
        marker.unlink()


@pytest.mark.parametrize("mode", _modes())
def test_host_service_sockets_and_home_directories_are_hidden(mode):
    if mode == "rlimit":
        pytest.skip("rlimit mode has no file-system isolation (known weaker; use bwrap)")
    path = Path("/run") / f"sfr-test-{uuid.uuid4().hex[:8]}.sock"
    try:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    except OSError as exc:
        pytest.skip(f"cannot create a Unix socket in /run here: {exc}")
    try:
        os.chmod(path, 0o777)  # anyone may connect: only the sandbox can stop it
        server.listen(1)
        server.settimeout(0.3)
        program = (f"import os, socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({str(path)!r})\n"
                   f"    print('connected')\nexcept OSError as e:\n    print('refused', type(e).__name__)\n"
                   "print('run', os.listdir('/run'))\n"
                   "print('home', [f for d in ('/home', '/root') if os.path.isdir(d) for f in os.listdir(d)])\n")
        result, _ = _run(program, mode)
        assert result.passed and "refused" in result.stdout and "connected" not in result.stdout, result
        assert "run []" in result.stdout
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
        path.unlink()


@pytest.mark.parametrize("mode", _modes())
def test_file_size_limit(mode):
    program = "with open('big.bin', 'wb') as f:\n    for _ in range(64):\n        f.write(b'x' * (1 << 20))\n"
    result, elapsed = _run(program, mode, file_size_bytes=1 << 20)
    assert result.status == "error" and not result.passed and elapsed < TIMEOUT + SLACK
    assert "SIGXFSZ" in result.reason or "File too large" in result.reason, result.reason


def _assert_cannot_reach_host_loopback(mode):
    """A program of ``mode`` cannot connect to a listener on the host's loopback (nothing arrives)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.3)
        port = server.getsockname()[1]
        program = (f"import socket\ns = socket.socket()\ns.settimeout(0.5)\ntry:\n"
                   f"    s.connect(('127.0.0.1', {port}))\n    s.sendall(b'pwned')\n    print('connected')\n"
                   f"except OSError as e:\n    print('refused', type(e).__name__)\n")
        result, _ = _run(program + "print('interfaces', sorted(n for _, n in socket.if_nameindex()))\n", mode)
        assert result.passed and "refused" in result.stdout and "connected" not in result.stdout, result
        assert "interfaces ['lo']" in result.stdout  # a network namespace of its own: loopback only
        with pytest.raises(socket.timeout):
            server.accept()  # nothing arrived
    return result


@pytest.mark.parametrize("mode", _modes())
def test_no_network(mode):
    if not sandbox_isolates_network(mode):
        pytest.skip(f"{mode} mode cannot create a network namespace here (no root, no user namespaces)")
    _assert_cannot_reach_host_loopback(mode)


@pytest.fixture
def without_bwrap(monkeypatch, tmp_path):
    """bubblewrap hidden (a PATH without it) and the probed sandboxes forgotten, as on a machine
    without bubblewrap; the sandbox runs its interpreter by absolute path, so it needs no PATH."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("bwrap") is None
    monkeypatch.setattr(sandbox, "_BACKENDS", {})
    monkeypatch.setattr(sandbox, "_WARNED", set())


def test_auto_without_bwrap_cuts_the_network(without_bwrap):
    if os.geteuid() != 0 and not sandbox_available("auto"):
        pytest.skip("no root and no unprivileged user namespaces here: auto refuses (see the refusal test)")
    with pytest.warns(RuntimeWarning, match="network namespace of its own"):
        result = _assert_cannot_reach_host_loopback("auto")
    assert result.sandbox == "rlimit" and sandbox_isolates_network("auto")


def test_auto_refuses_when_no_isolation_is_possible(without_bwrap, monkeypatch):
    # unshare(0x1) fails (EINVAL) as creating a network namespace does where it is not allowed
    monkeypatch.setattr(sandbox, "UNSHARE_NETWORK", (0x1,))
    with pytest.raises(RuntimeError) as refused:
        check_program("print(1)\n", timeout=TIMEOUT)
    message = str(refused.value)
    assert "\n" not in message and "apt-get install bubblewrap" in message and "--sandbox rlimit" in message
    assert not sandbox_available("auto")
    # the explicit opt-in still runs programs, says loudly that they have the network, and is reported
    with pytest.warns(RuntimeWarning, match="CAN open network connections"):
        result = check_program("print('ran')\n", timeout=TIMEOUT, mode="rlimit")
    assert result.passed and result.stdout.strip() == "ran" and result.sandbox == "rlimit"
    assert not sandbox_isolates_network("rlimit")


def test_eval_code_refuses_with_one_line(without_bwrap, monkeypatch, tmp_path, capsys):
    from sfr.cli import main

    monkeypatch.setattr(sandbox, "UNSHARE_NETWORK", (0x1,))
    assert main(["eval", "code", "--model", "sfr-tiny", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sfr eval code: error: {sandbox.NO_ISOLATION}"


@pytest.mark.parametrize("mode", _modes())
def test_host_environment_is_not_visible(mode, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("SFR_TEST_SECRET", secret)
    result, _ = _run("import os\nprint(sorted(os.environ.items()))\n"
                     "print(open('/proc/self/environ', 'rb').read())\n", mode)
    assert result.passed and "PATH" in result.stdout
    assert secret not in result.stdout and "SFR_TEST_SECRET" not in result.stdout
    # the environments of every process it can see (its parent's, this test process's, ...)
    _skip_unless_isolated_from_this_user(mode)
    scan = ("import os\nfound = 0\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n        try:\n"
            "            data = open('/proc/%s/environ' % pid, 'rb').read()\n"
            "            found += data.count(b'SFR_TEST_SECRET')\n        except OSError:\n            pass\n"
            "print('found', found)\n")
    result, _ = _run(scan, mode)
    assert result.passed and "found 0" in result.stdout, result


@pytest.mark.parametrize("mode", _modes())
def test_cannot_kill_parent_or_test_process(mode):
    _skip_unless_isolated_from_this_user(mode)
    program = (f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}, {os.getppid()}):\n    try:\n"
               f"        os.kill(pid, signal.SIGKILL)\n    except OSError as e:\n"
               f"        print('blocked', pid, type(e).__name__)\n"
               f"print('end')\n")
    result, _ = _run(program, mode)
    os.kill(os.getpid(), 0)  # we are alive (else the test run would have died here)
    assert "end" in result.stdout  # the program ran to the end ...
    assert f"blocked {os.getpid()}" in result.stdout  # ... and its kill of this process was refused
    if mode == "bwrap":  # kill(-1) = every process it may signal; in rlimit mode that is every 'nobody' process
        helper = subprocess.Popen(["sleep", "30"])
        try:
            result, _ = _run("import os, signal\nos.kill(-1, signal.SIGKILL)\n", mode)
            assert not result.passed
            assert helper.poll() is None  # a host process of ours survived
        finally:
            helper.kill()
            helper.wait()


@pytest.mark.parametrize("mode", _modes())
def test_output_flood_is_capped_and_returns_quickly(mode):
    result, elapsed = _run("import sys\nwhile True:\n    sys.stdout.write('x' * 8192)\n", mode,
                           output_bytes=4096, output_kill_bytes=1 << 20)
    assert not result.passed and result.output_truncated and elapsed < TIMEOUT
    assert len(result.stdout) <= 4096 and "output exceeded" in result.reason
    slow, elapsed = _run("import sys, time\nfor _ in range(10**9):\n    print('y' * 100)\n", mode,
                         output_bytes=4096)
    assert not slow.passed and len(slow.stdout) <= 4096 and elapsed < TIMEOUT + SLACK
    err, elapsed = _run("import os\nwhile True:\n    os.write(2, b'z' * 65536)\n", mode, output_bytes=4096,
                        output_kill_bytes=1 << 20)
    assert not err.passed and err.output_truncated and len(err.stderr) <= 4096 and elapsed < TIMEOUT
    # a passing program with a big (capped) output still passes: the end-of-program check sees the tail
    big, _ = _run("print('w' * 200000)\nassert True\n", mode, output_bytes=4096)
    assert big.passed and big.output_truncated and len(big.stdout) <= 4096


def test_mode_is_reported_and_validated():
    assert sandbox_mode("auto") in ("bwrap", "rlimit")
    assert check_program("print(1)", timeout=TIMEOUT).sandbox == sandbox_mode("auto")
    with pytest.raises(ValueError, match="mode"):
        check_program("print(1)", mode="docker")
    with pytest.raises(ValueError, match="timeout"):
        check_program("print(1)", timeout=0)
    with pytest.raises(TypeError, match="program"):
        check_program(b"print(1)")


@pytest.mark.parametrize("mode", _modes())
def test_program_that_outlives_its_killed_parent_is_stopped(mode):
    # rlimit mode: the program kills its shepherd, then keeps running; it must not survive the run
    program = ("import os, signal, time\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n"
               "    pass\ntime.sleep(60)\n")
    result, elapsed = _run(program, mode)
    assert not result.passed and elapsed < TIMEOUT + SLACK
    _assert_no_leftovers()


@pytest.mark.parametrize("mode", _modes())
def test_killing_the_parent_and_leaving_the_session_does_not_escape(mode):
    _skip_unless_isolated_from_this_user(mode)
    # try to kill the sandbox's own parent, then hide in a new session and sleep past the timeout
    program = ("import os, signal, time\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n"
               "    pass\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n"
               "time.sleep(60)\n")
    result, elapsed = _run(program, mode)
    assert not result.passed and elapsed < TIMEOUT + SLACK
    _assert_no_leftovers()


@pytest.mark.parametrize("mode", _modes())
def test_sandbox_dies_with_the_evaluating_process(mode):
    import select
    import sys

    # The evaluator probes the sandbox first (a short program through the same runner), then says
    # "ready": only a runner seen after that is the long-running program.
    evaluator = subprocess.Popen(
        [sys.executable, "-c", "import warnings; warnings.simplefilter('ignore')\n"
         "from sfr.eval import check_program\nfrom sfr.eval.sandbox import sandbox_available\n"
         f"assert sandbox_available({mode!r})\nprint('ready', flush=True)\n"
         f"check_program('import time\\ntime.sleep(120)\\n', timeout=60, mode={mode!r})\n"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]),
                                                                         os.environ.get("PYTHONPATH")]))},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([evaluator.stdout], [], [], 20)
        assert ready and evaluator.stdout.readline().strip() == "ready", evaluator.stderr.read()[-2000:]
        deadline = time.monotonic() + 20
        while not _runners_under(evaluator.pid) and evaluator.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _runners_under(evaluator.pid):
            state = "still running" if evaluator.poll() is None else f"exited {evaluator.returncode}"
            err = "" if evaluator.poll() is None else evaluator.stderr.read()[-2000:]
            pytest.fail(f"the sandboxed program never started (evaluator {state}): {err}")
        evaluator.kill()  # SIGKILL: no clean-up code of ours runs
        evaluator.wait()
        _assert_no_leftovers()  # the kernel (die-with-parent / parent-death signal) took the sandbox down
    finally:
        if evaluator.poll() is None:
            evaluator.kill()
            evaluator.wait()
