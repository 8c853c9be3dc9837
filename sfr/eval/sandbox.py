"""Run untrusted (model-generated) Python programs in a sandbox and say whether they passed.

Two isolation modes, chosen by ``mode``:

``"bwrap"`` (preferred; bubblewrap, ``apt-get install -y bubblewrap``)
    The program runs in fresh namespaces (``--unshare-all``: user, PID, network, IPC, UTS, cgroup),
    so it sees no network (only its own empty loopback), cannot see or signal host processes, and
    everything it starts dies with the sandbox (``--die-with-parent``; killing bwrap kills the PID
    namespace). The host file system is mounted read-only (``--ro-bind / /``); ``/tmp`` is a private,
    size-limited tmpfs that is also the working directory (the scratch dir); ``/proc`` and ``/dev``
    are private; ``/run``, ``/home``, ``/root``, ``/mnt`` and ``/media`` are hidden behind empty,
    read-only tmpfs mounts (:data:`MASKED_DIRS`: no host service sockets, no users' files; the interpreter's own prefix
    is bound back read-only when it lives there). The environment is cleared (``--clearenv``, then a minimal ``PATH``), and
    ``--new-session`` detaches it from the controlling terminal.
``"rlimit"`` (fallback when bwrap is missing or unusable; weaker)
    The program runs in a network namespace of its own (``unshare(CLONE_NEWNET)``; without root, in a
    new user namespace too), so it sees only a loopback device that is down and cannot connect to the
    host's ports or any other network; in its own session / process group with a cleared environment,
    a fresh scratch temp directory as its working directory, and a small "shepherd" parent (running
    as the evaluating user, so a program dropped to ``nobody`` cannot kill it) that creates the
    namespace, is a child sub-reaper and kills every descendant when the program ends, times out, or
    the evaluating process dies. There is no file-system isolation: it can write wherever its user
    may, and its scratch dir lives on the host's temp file system (file size is limited per file, not
    in total). Without root, the program runs as this very user and can signal this user's processes.
    Where no network namespace can be created (no root and no unprivileged user namespaces), an
    explicit ``mode="rlimit"`` (``--sandbox rlimit``) still runs programs, with a warning, *with* the
    host's network; ``"auto"`` refuses then (:data:`NO_ISOLATION`).

In both modes, resource limits are set with ``setrlimit`` before any program code runs (by the runner
script, and in rlimit mode first by the shepherd; inherited by everything the program starts): CPU
seconds, address space (memory), number of processes (fork bombs), file size and open files; and a
wall-clock timeout kills the whole process group / namespace.
When this process runs as root, the program runs as the unprivileged user ``nobody`` (uid 65534):
root ignores the process-count limit, and ``nobody`` cannot write root's files or signal root's
processes (this matters most in ``"rlimit"`` mode). The interpreter used inside is the current one
when ``nobody`` can execute it, else the system ``python3`` (probed once and cached).

Output is capped: at most :attr:`SandboxLimits.output_bytes` of each stream is kept (plus a short
tail), the pipes are drained so a flood cannot block, and a program whose output passes
:attr:`SandboxLimits.output_kill_bytes` is killed.

A program *passes* only if its code ran to the end: the runner executes it and then writes a random
per-run token (``uuid4``) on its own line straight to file descriptor 1 (so a program that replaced
``sys.stdout`` still passes); the token is not in the program text (the runner reads it from stdin,
which it then closes). ``passed`` iff the exit code is 0 and the token is the last line of stdout, so
an early ``exit(0)`` / ``os._exit(0)`` / ``raise SystemExit`` fails. (A program that deliberately digs
the token out of the runner's frame could forge a pass: this guards against generated code that stops
early, not against code written to defeat the check.)
"""
from __future__ import annotations

import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field

from sfr.checks import check_int
from sfr.eval.sandbox_scripts import RUNNER, SHEPHERD

MODES = ("auto", "bwrap", "rlimit")
STATUSES = ("passed", "failed", "timeout", "error")
NOBODY_UID = 65534
NOBODY_GID = 65534
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_TAIL_BYTES = 4096
# How the rlimit shepherd gets a network namespace, tried in order: CLONE_NEWNET (needs CAP_SYS_ADMIN,
# e.g. root), then CLONE_NEWUSER | CLONE_NEWNET (unprivileged user namespaces give that capability).
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
UNSHARE_NETWORK = (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET)
NO_ISOLATION = ("no isolating sandbox for generated code here: bubblewrap is not installed or not usable "
                "(apt-get install bubblewrap) and this process cannot create a network namespace; to run "
                "the programs anyway with rlimits only, network access included, opt in with --sandbox "
                "rlimit (Python: mode='rlimit')")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run (applied with ``setrlimit`` and a wall-clock timer)."""

    timeout: float = 3.0  # wall-clock seconds; the whole sandbox is killed after it
    memory_bytes: int = 1 << 30  # RLIMIT_AS per process
    max_processes: int = 32  # processes/threads the program may add (RLIMIT_NPROC, on top of what its user runs)
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE
    open_files: int = 256  # RLIMIT_NOFILE
    scratch_bytes: int = 64 << 20  # size of the private /tmp tmpfs (bwrap mode)
    output_bytes: int = 64 << 10  # kept per stream (stdout, stderr)
    output_kill_bytes: int = 4 << 20  # total output after which the program is killed

    def __post_init__(self):
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        for name in ("memory_bytes", "max_processes", "file_size_bytes", "open_files", "scratch_bytes",
                     "output_bytes", "output_kill_bytes"):
            check_int(name, getattr(self, name))


@dataclass
class ProgramResult:
    """Outcome of :func:`check_program`.

    ``status``: ``"passed"`` (exit 0 and the end-of-program token printed), ``"failed"`` (it ran but
    did not pass: an ``AssertionError``, or an early exit), ``"timeout"`` (wall clock or CPU limit),
    ``"error"`` (any other crash: syntax error, other exception, killed by a signal or a limit, or the
    sandbox could not run it; ``reason`` says which).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    sandbox: str  # "bwrap" or "rlimit"
    duration: float  # seconds
    reason: str = ""
    output_truncated: bool = False
    passed: bool = field(init=False)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        self.passed = self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Backend:
    mode: str
    interpreter: str
    uid: int | None  # run as this uid (None: as ourselves)
    bwrap: str | None = None
    bwrap_extra: tuple[str, ...] = ()  # optional flags this bwrap accepts
    netns: bool = False  # rlimit mode: the shepherd puts the program in a new network namespace


_BACKENDS: dict[str, _Backend | None] = {}
_BACKEND_LOCK = threading.Lock()
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _candidate_uids() -> list[int | None]:
    # root: drop to nobody (root ignores RLIMIT_NPROC); last resort: stay root
    return [NOBODY_UID, None] if os.geteuid() == 0 else [None]


def _candidate_interpreters() -> list[str]:
    found = [sys.executable]
    system = shutil.which("python3", path=SANDBOX_PATH)
    if system and os.path.realpath(system) != os.path.realpath(sys.executable):
        found.append(system)
    return found


def _gid_of(uid: int) -> int:
    return NOBODY_GID if uid == NOBODY_UID else uid


def _user_kwargs(uid: int | None) -> dict:
    if uid is None:
        return {}
    return {"user": uid, "group": _gid_of(uid), "extra_groups": []}


# Host directories hidden behind an empty tmpfs in bwrap mode ("mask"): sockets of host services
# (/run: docker, dbus, systemd; a read-only mount does not stop connect() on a Unix socket) and users'
# files (keys, credentials). The interpreter's own prefix is bound back when it lives under one of them.
MASKED_DIRS = ("/run", "/var/run", "/home", "/root", "/mnt", "/media")


def _interpreter_paths(interpreter: str) -> list[str]:
    """Directories the interpreter needs (its prefixes and its binary's folder), as far as we know them."""
    paths = {os.path.dirname(os.path.realpath(interpreter)), os.path.dirname(os.path.abspath(interpreter))}
    if os.path.realpath(interpreter) == os.path.realpath(sys.executable):
        paths |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        paths |= {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    return sorted(p for p in paths if p and os.path.isdir(p))


def _mask_arguments(interpreter: str) -> list[str]:
    masked = [d for d in MASKED_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    arguments = [flag for d in masked for flag in ("--tmpfs", d)]
    kept: list[str] = []
    for path in _interpreter_paths(interpreter):  # sorted: a folder comes before its subfolders
        inside_mask = any(path == d or path.startswith(d + "/") for d in masked)
        if inside_mask and not any(path == k or path.startswith(k + "/") for k in kept):
            kept.append(path)
            arguments += ["--ro-bind", path, path]
    return arguments + [flag for d in masked for flag in ("--remount-ro", d)]  # empty and read-only


def _bwrap_command(backend: _Backend, limits: SandboxLimits, program_path: str, argv: list[str]) -> list[str]:
    command = [backend.bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/"]
    if "mask" in backend.bwrap_extra:
        command += _mask_arguments(backend.interpreter)
    if "--size" in backend.bwrap_extra:
        command += ["--size", str(limits.scratch_bytes)]
    command += ["--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev", "--chdir", "/tmp",
                "--clearenv", "--setenv", "PATH", SANDBOX_PATH, "--setenv", "HOME", "/tmp",
                "--setenv", "LANG", "C.UTF-8"]
    if "--disable-userns" in backend.bwrap_extra:  # no nested user namespaces inside
        command += ["--unshare-user", "--disable-userns"]
    command += ["--ro-bind", program_path, "/tmp/program.py"]
    return command + ["--"] + argv


def _probe(mode: str) -> _Backend | None:
    """Find a working (uid, interpreter[, bwrap flags]) for ``mode`` by running a trivial program.

    Candidates in order of preference: rlimit mode in a new network namespace, then without one; as
    ``nobody`` when root, then as ourselves; the current interpreter, then the system ``python3``;
    bwrap with the masked host directories, ``--size`` and ``--disable-userns``, then without what an
    older bwrap (or an interpreter under a masked directory) does not allow."""
    limits = SandboxLimits(timeout=10.0)
    bwrap = shutil.which("bwrap") if mode == "bwrap" else None
    if mode == "bwrap" and bwrap is None:
        return None
    flag_sets = [("mask", "--size", "--disable-userns"), ("mask", "--size"), ("mask",),
                 ("--size", "--disable-userns"), ("--size",), ()] if mode == "bwrap" else [()]
    for netns in ((True, False) if mode == "rlimit" else (False,)):
        for uid in _candidate_uids():
            for interpreter in _candidate_interpreters():
                for flags in flag_sets:
                    backend = _Backend(mode, interpreter, uid, bwrap, flags, netns)
                    # a real run, exactly as check_program does it (scratch dir, mounts, namespace, limits)
                    result = _execute(backend, "import sys\nprint('probe', sys.version_info[0])\n", limits)
                    if result.passed and result.stdout.strip() == "probe 3":
                        return backend
    return None


def _backend(mode: str) -> _Backend:
    backend = _resolve(mode)
    if backend.mode == "rlimit" and backend.netns:
        _warn_once("rlimit", "sandbox: bubblewrap is not in use; running generated code with rlimits in a "
                   "network namespace of its own (no network), a separate process group and a cleared "
                   "environment (weaker isolation: no file-system isolation). Install bubblewrap for real "
                   "isolation (apt-get install bubblewrap).")
    elif backend.mode == "rlimit":
        _warn_once("rlimit-network", "sandbox: --sandbox rlimit without a network namespace (none can be "
                   "created here): generated code runs with rlimits only and CAN open network connections "
                   "(and has no file-system isolation). Install bubblewrap for isolation (apt-get install bubblewrap).")
    if backend.uid is None and os.geteuid() == 0:
        _warn_once("root", "sandbox: running generated code as root (could not run it as 'nobody'); "
                   "the process-count limit is not enforced for root")
    return backend


def _resolve(mode: str) -> _Backend:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    wanted = ("bwrap", "rlimit") if mode == "auto" else (mode,)
    with _BACKEND_LOCK:
        for name in wanted:
            if name not in _BACKENDS:
                _BACKENDS[name] = _probe(name)
            backend = _BACKENDS[name]
            # auto never falls back to a sandbox that leaves the program the network
            if backend is not None and (mode != "auto" or backend.mode == "bwrap" or backend.netns):
                break
        else:
            if mode == "auto":
                raise RuntimeError(NO_ISOLATION)
            hint = " (install bubblewrap: apt-get install -y bubblewrap)" if "bwrap" in wanted else ""
            raise RuntimeError(f"no usable sandbox for mode={mode!r}{hint}")
    return backend


def sandbox_available(mode: str) -> bool:
    """True if ``mode`` ("bwrap" / "rlimit" / "auto") can run programs on this machine (probed once)."""
    try:
        _resolve(mode)
        return True
    except RuntimeError:
        return False


def sandbox_mode(mode: str = "auto") -> str:
    """The mode that ``mode`` resolves to here ("bwrap" or "rlimit"); RuntimeError if none works."""
    return _resolve(mode).mode


def sandbox_isolates_network(mode: str = "auto") -> bool:
    """True if programs of ``mode`` run without access to any network (bwrap, or rlimit in its own
    network namespace); RuntimeError if ``mode`` cannot run here."""
    backend = _resolve(mode)
    return backend.mode == "bwrap" or backend.netns


def sandbox_runs_as_other_user(mode: str = "auto") -> bool:
    """True if programs run under a different uid than this process (so they cannot touch its files)."""
    backend = _resolve(mode)
    return backend.uid is not None and backend.uid != os.getuid()


def _tasks_of_user(uid: int) -> int:
    """Number of tasks (threads) the user runs now: what RLIMIT_NPROC counts."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return count


def _limits_spec(limits: SandboxLimits, nproc: int) -> str:
    """The limits as the "cpu,memory,file_size,open_files,processes" argument of RUNNER/SHEPHERD."""
    cpu_seconds = math.ceil(limits.timeout) + 1
    return f"{cpu_seconds},{limits.memory_bytes},{limits.file_size_bytes},{limits.open_files},{nproc}"


class _CappedStream:
    """Keeps the first ``cap`` bytes and the last few KiB of a stream; counts the rest."""

    def __init__(self, cap: int):
        self.cap, self.head, self.tail, self.total = cap, bytearray(), bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
        self.tail = (self.tail + chunk)[-_TAIL_BYTES:]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        return self.head.decode("utf-8", errors="replace")

    def lines_at_end(self) -> list[bytes]:
        return bytes(self.tail).splitlines()


def _kill(process: subprocess.Popen, backend: _Backend) -> None:
    if backend.mode == "rlimit":
        try:  # the shepherd kills the descendants that left the process group
            os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout=0.5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:  # bwrap: killing its process group tears down the PID namespace (--die-with-parent)
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass


def check_program(program: str, timeout: float = 3.0, *, mode: str = "auto",
                  limits: SandboxLimits | None = None) -> ProgramResult:
    """Run ``program`` (Python source; tests included) in the sandbox; see the module docstring.

    ``timeout`` (wall-clock seconds) overrides ``limits.timeout``. Returns a :class:`ProgramResult`;
    never raises for anything the program does. ``ValueError``/``TypeError`` on bad arguments,
    ``RuntimeError`` if no sandbox of ``mode`` can run here.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str of Python source, got {type(program).__name__}")
    limits = SandboxLimits(**{**asdict(limits or SandboxLimits()), "timeout": float(timeout)})
    return _execute(_backend(mode), program, limits)


def _execute(backend: _Backend, program: str, limits: SandboxLimits) -> ProgramResult:
    token = uuid.uuid4().hex
    scratch = tempfile.mkdtemp(prefix="sfr-sandbox-")
    try:
        os.chmod(scratch, 0o755)
        program_path = os.path.join(scratch, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        os.chmod(program_path, 0o644)
        nproc_uid = os.getuid() if backend.uid is None else backend.uid
        # RLIMIT_NPROC counts all of the user's tasks, so allow what it already runs plus our budget
        # (+4 for bwrap's own processes or the shepherd)
        nproc = _tasks_of_user(nproc_uid) + limits.max_processes + 4
        spec = _limits_spec(limits, nproc)
        # the runner (and in rlimit mode the shepherd) sets the rlimits before any program code runs;
        # done there rather than in a preexec_fn, which is unsafe when several threads run programs
        run_argv = [backend.interpreter, "-I", "-c", RUNNER]
        if backend.mode == "bwrap":
            argv = _bwrap_command(backend, limits, program_path, run_argv + ["/tmp/program.py", spec])
            cwd = "/"
        else:
            if backend.uid is not None:
                os.chown(scratch, backend.uid, _gid_of(backend.uid))
            ids = ["-", "-"] if backend.uid is None else [str(backend.uid), str(_gid_of(backend.uid))]
            unshare = ",".join(str(flags) for flags in UNSHARE_NETWORK) if backend.netns else "-"
            argv = ([backend.interpreter, "-I", "-c", SHEPHERD, spec, str(os.getpid()), *ids, unshare] + run_argv
                    + [program_path, spec])
            cwd = scratch
        return _run(argv, cwd, token, limits, backend)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(argv, cwd, token, limits, backend) -> ProgramResult:
    env = {"PATH": SANDBOX_PATH, "HOME": cwd, "LANG": "C.UTF-8"}
    start = time.monotonic()
    try:
        # bwrap runs as the program's user; the rlimit shepherd runs as us and drops the program itself
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                   **(_user_kwargs(backend.uid) if backend.mode == "bwrap" else {}))
    except OSError as exc:
        return ProgramResult("error", None, "", "", backend.mode, 0.0, reason=f"could not start: {exc}")
    try:
        process.stdin.write(token.encode() + b"\n")
        process.stdin.close()
    except OSError:  # the program may already be gone
        pass
    streams = {process.stdout.fileno(): _CappedStream(limits.output_bytes),
               process.stderr.fileno(): _CappedStream(limits.output_bytes)}
    deadline = start + limits.timeout
    timed_out = flooded = False
    with selectors.DefaultSelector() as selector:
        for fd in streams:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        exited_at = None
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = process.poll() is None
                break
            if exited_at is None and process.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # something outside the sandbox's reach still holds the pipe; stop reading
            for key, _ in selector.select(timeout=min(0.1, deadline - now)):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if chunk:
                    streams[key.fd].add(chunk)
                else:
                    selector.unregister(key.fd)
            if sum(s.total for s in streams.values()) > limits.output_kill_bytes:
                flooded = True
                break
    if timed_out or flooded or process.poll() is None:
        # either we stop it, or it is about to exit (pipes closed); give it a moment before killing
        if not (timed_out or flooded):
            try:
                process.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                timed_out = True
        if process.poll() is None:
            _kill(process, backend)
    try:
        returncode = process.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        returncode = None
    if backend.mode == "rlimit":
        try:  # members of the group that outlived a killed shepherd (bwrap: the namespace is gone already)
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
    duration = time.monotonic() - start
    process.stdout.close()
    process.stderr.close()
    out, err = list(streams.values())
    stdout_lines = out.lines_at_end()
    token_line = token.encode()
    printed_token = bool(stdout_lines) and stdout_lines[-1].strip() == token_line
    stdout = out.text()
    if printed_token:  # hide the runner's token line from the reported output
        cut = stdout.rfind(token)
        if cut >= 0:
            stdout = stdout[:cut].rstrip("\n")
    stderr = err.text()
    status, reason = _classify(returncode, printed_token, stderr, timed_out, flooded, limits)
    return ProgramResult(status, returncode, stdout, stderr, backend.mode, duration, reason,
                         output_truncated=out.truncated or err.truncated)


def _classify(returncode, printed_token, stderr, timed_out, flooded, limits) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"still running after {limits.timeout:g} s"
    if flooded:
        return "error", f"output exceeded {limits.output_kill_bytes} bytes"
    if returncode == 0 and printed_token:
        return "passed", ""
    if returncode == 0:
        return "failed", "exited before its code finished (end-of-program token not printed)"
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "timeout", "CPU time limit"
    last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if last_line.startswith("AssertionError"):
        return "failed", last_line
    if returncode is not None and (returncode < 0 or returncode > 128):
        number = -returncode if returncode < 0 else returncode - 128
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return "error", f"killed by signal {name}"
    return "error", last_line or f"exit code {returncode}"
