"""The programs that run inside the code sandbox (:mod:`sfr.eval.sandbox`), as Python source.

They run in a separate interpreter started with ``-I -c``, so they import nothing of sfr:
:data:`RUNNER` executes the generated program and prints the end-of-program token;
:data:`SHEPHERD` (rlimit mode only) is the program's parent, which cuts the network (a new network
namespace), drops privileges, and kills every descendant when the program ends.
"""

# Sets the rlimits given as "cpu,memory,file_size,open_files,processes" (inherited by every child).
LIMITS = r"""
def _sfr_limit(spec):
    import resource
    cpu, memory, file_size, open_files, processes = (int(v) for v in spec.split(","))
    for which, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
                              (resource.RLIMIT_FSIZE, file_size, file_size),
                              (resource.RLIMIT_NOFILE, open_files, open_files),
                              (resource.RLIMIT_NPROC, processes, processes), (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(which, (soft, hard))
"""

# Executes the program file as __main__, then prints the token it read from stdin. The token lives
# only in a local of a function that has not returned, so the program's globals do not hold it.
RUNNER = LIMITS + r"""
import os, sys
_sfr_limit(sys.argv[2])
def _sfr_run(path):
    token = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, path, "exec")
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    for stream in (sys.stdout, sys.__stdout__):  # the program may have replaced or closed sys.stdout
        try:
            stream.flush()
        except Exception:
            pass
    os.write(1, ("\n" + token + "\n").encode())
_sfr_run(sys.argv[1])
"""

# rlimit mode only: the program's parent. It runs as the evaluating user (so a program running as
# 'nobody' cannot signal it), first moves into a new network namespace when asked (unshare with each
# flag set of a comma-separated list in turn, until one works: CLONE_NEWNET as root, CLONE_NEWUSER |
# CLONE_NEWNET otherwise; none works -> exit 125 with a message, before any program code runs), so the
# program sees only a loopback device that is down and cannot reach the host's or any other network.
# It then becomes a child sub-reaper (orphans of the program are re-parented to it, so a double fork
# or a new session cannot escape), drops the program to the given uid/gid, forwards the exit status,
# and kills every descendant when the program ends, on SIGTERM, when the evaluating process dies
# (PR_SET_PDEATHSIG) and at a wall-clock backstop (SIGALRM, a few seconds after the timeout).
# argv: spec, evaluator pid, uid or "-", gid or "-", unshare flag sets or "-", then the program's command.
SHEPHERD = LIMITS + r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
spec, evaluator, uid, gid, unshare = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
if unshare != "-":
    for flags in unshare.split(","):
        if libc.unshare(int(flags)) == 0:
            break
    else:
        os.write(2, b"sandbox: cannot create a network namespace: %s\n" % os.strerror(ctypes.get_errno()).encode())
        os._exit(125)
_sfr_limit(spec)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
me = os.getpid()
def children():
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    stat = f.read()
                if int(stat[stat.rindex(b")") + 2:].split()[1]) == me:
                    found.append(int(name))
            except (OSError, ValueError):
                pass
    return found
def kill_descendants():
    for _ in range(200):
        pids = children()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
def on_term(signum, frame):
    kill_descendants()
    os._exit(128 + signum)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGALRM, on_term)
signal.alarm(int(spec.split(",")[0]) + 4)
libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: the evaluator dies -> SIGTERM -> clean up
if os.getppid() != evaluator:  # it died before the line above
    on_term(signal.SIGTERM, None)
child = os.fork()
if child == 0:
    try:
        if uid != "-":
            os.setgroups([])
            os.setgid(int(gid))
            os.setuid(int(uid))
        os.execv(sys.argv[6], sys.argv[6:])
    finally:
        os._exit(127)
while True:
    pid, status = os.waitpid(-1, 0)
    if pid == child:
        break
kill_descendants()
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""
