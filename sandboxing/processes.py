"""Creating and ending a run's processes: the body of a forked run from fork to its untrusted
code (descriptors, confinement, what it executes), the trusted records of a run (exit status,
CPU time, output), reaping, and the kill sweep of the fallback without PID namespaces."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pickle
import select
import signal
import sys
import traceback
import types
from typing import Any

from .constants import EXIT_MEMORY, EXIT_SETUP, MAX_FD
from .fdio import HeadTail, read_all
from .isolation import candidate_env, confine
from .rpc_untrusted import describe_exception, serve_candidate


@dataclasses.dataclass
class Child:
    """An untrusted process; ``pid`` as its parent (the zygote, or the worker) sees it."""

    pid: int
    pidfd: int | None
    cpu_limit: int
    status: int | None = None
    cpu_time: float = 0.0

    def has_exited(self) -> bool:
        if self.status is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == 0:
                return False
            self.record(status, usage)
        return True

    def record(self, status: int, usage) -> None:
        self.status = status
        self.cpu_time = usage.ru_utime + usage.ru_stime


class ProgramRun:
    """What one confined program run produced, as seen by the trusted worker."""

    def __init__(self, output_limit: int):
        self.output_limit = output_limit
        self.stdout = bytearray()
        self.stderr = HeadTail(2048, 2048)
        self.setup_report = bytearray()
        self.output_bytes = 0
        self.output_exceeded = False
        self.timed_out = False
        self.status: int | None = None
        self.cpu_time = 0.0
        self.cpu_limit = 0

    def stderr_text(self) -> str:
        return self.stderr.text()


def child_main(iso, spec, fds, run_dir, limits, report_fd, preset: bool) -> None:
    """Body of a run's process from fork to the untrusted code; never returns. ``spec`` is the
    run's spec, or the number of a memfd holding it (pickled by the worker)."""
    try:
        if isinstance(spec, int):
            spec = pickle.loads(read_all(spec))
        _install_fds(fds)
        if report_fd is not None:
            os.set_inheritable(report_fd, False)
        confine(iso, run_dir, limits, preset)
        run_spec(spec)
    except BaseException as exc:
        if report_fd is not None:
            _report_setup_failure(report_fd, exc)
    finally:
        os._exit(EXIT_SETUP)


def run_spec(spec: tuple) -> None:
    """What a run's process executes, named by plain data (it may travel to the zygote)."""
    kind = spec[0]
    if kind == "function":
        serve_candidate(spec[1], spec[2])
    elif kind == "python":
        _run_python_program(spec[1])
    elif kind == "exec":
        _, path, argv, run_dir = spec
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; exec would keep that
            signal.signal(sig, signal.SIG_DFL)
        os.execve(path, argv, candidate_env(run_dir))
    elif kind == "probe":
        _report_identity(spec[1])
    raise ValueError(f"unknown run kind {kind!r}")


def _install_fds(fds: dict[int, int]) -> None:
    """Make the child's fd table exactly ``fds`` (its number -> our fd); close everything else.

    A source whose number is itself a target is first moved above every target, so no dup2 can
    clobber a source that a later target still needs (the usual case needs no such move)."""
    top = max(fds) + 1
    moves = [
        (t, s if s >= top else fcntl.fcntl(s, fcntl.F_DUPFD_CLOEXEC, top)) for t, s in fds.items()
    ]
    for target, source in moves:
        os.dup2(source, target)
    os.closerange(top, MAX_FD)
    low = 0
    for fd in sorted(fds):  # close the numbers below top that are not targets
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1


def _report_setup_failure(report_fd: int, exc: BaseException) -> None:
    try:
        os.write(report_fd, f"{type(exc).__name__}: {exc}".encode()[:500])
    except OSError:
        pass


def signal_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def reap_all_children(run: Child | None = None) -> None:
    """Wait until no child is left (every process of the run is dead and reaped), recording the
    exit status of the run's own process on the way."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            return
        if run is not None and pid == run.pid and run.status is None:
            run.record(status, usage)


def watch_parent(poller, parent_fd: int) -> None:
    if parent_fd >= 0:
        poller.register(parent_fd, 0)  # no data is expected during a run: only hang-up counts


def exit_if_parent_gone(events: dict, parent_fd: int) -> None:
    """The parent closed its end (it exited or died): stop now rather than after the run. As
    the init of its PID namespace, the worker takes every process of the run with it."""
    if events.get(parent_fd, 0) & (select.POLLHUP | select.POLLERR):
        if os.getpid() != 1:  # fallback without a PID namespace: kill the run's processes first
            kill_all_descendants()
        os._exit(0)


def reap_strays() -> None:
    """Collect zombies reparented to us (the worker is the init of its PID namespace)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_all_descendants() -> None:
    """Fallback without PID namespaces: as a subreaper, every escaped descendant of a run ends
    up as our child; kill and reap until none is left."""
    me = os.getpid()
    for _ in range(1000):
        children = _children_of(me)
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        pass
    children = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    children.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return children


def _run_python_program(source: str) -> None:
    """Body of a stdio Python run: compile (a SyntaxError is reported before any code runs),
    execute as __main__, and exit with its status without waiting for leftover threads."""
    try:
        code = compile(source, "main.py", "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
        os.write(3, f"syntax:{describe_exception(exc)}".encode()[:500])
        os._exit(EXIT_SETUP)
    os.close(3)  # set-up is over: from here on only the program's own behaviour counts
    module = types.ModuleType("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module
    sys.argv = ["main.py"]
    status = 0
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except MemoryError:
        status = EXIT_MEMORY
        _print_error("MemoryError")
    except BaseException:
        status = 1
        _print_error(traceback.format_exc())
    try:
        sys.stdout.flush()
    except BaseException:
        status = status or 1
    os._exit(status)


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    _print_error(str(code))
    return 1


def _print_error(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except BaseException:
        pass


def _report_identity(fd: int) -> None:
    """Body of the probe run: who a run's process is (uid, capabilities), for describe()."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    report = {
        "uid": os.getuid(),
        "cap_eff": fields.get("CapEff", "?"),
        "no_new_privs": fields.get("NoNewPrivs", "?"),
    }
    os.write(fd, json.dumps(report).encode())
    os._exit(0)
