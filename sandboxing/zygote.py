"""The zygote: a copy of the worker, forked once and idle while a run executes, that forks the
process of every run and ends every run (kill(-1), reap) as the init of the runs' own PID
namespace."""

from __future__ import annotations

import errno
import gc
import os
import pickle
import select
import signal
from collections.abc import Sequence

from .fdio import write_all
from .isolation import Isolation, cpu_limit, set_per_worker_limits
from .kernel import PR_SET_CHILD_SUBREAPER, fork_without_hooks
from .processes import Child, child_main, reap_all_children, signal_quietly


class _ZygoteLost(Exception):
    pass


class Zygote:
    """The worker's handle on its zygote: a copy of the worker, forked once, that forks the
    process of every run and ends every run (kill(-1), reap).

    Why: after a fork, parent and child share their memory copy-on-write, so each page the
    worker touched while a run was alive (running the test, the RPC) was copied, a few hundred
    page faults per run. The zygote sits idle while a run executes. It is the init of the runs'
    PID namespace (see :meth:`Isolation.fork_zygote`), so their signals do not reach it; if it
    dies or hangs anyway, the worker, init of its own namespace, kills every other process
    itself and starts a new zygote in a new runs' namespace."""

    SPAWN_LIMIT = 10.0
    END_LIMIT = 3.0

    def __init__(self, iso: Isolation, close_in_zygote: Sequence[int]):
        self.iso = iso
        self.close_in_zygote = tuple(close_in_zygote)
        self.sock = None
        self.pid = -1
        self.start()

    def start(self) -> None:
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = self.iso.fork_zygote()
        if pid == 0:
            try:
                ours.close()
                for fd in self.close_in_zygote:  # the worker's pipes to the parent among them
                    os.close(fd)
                _zygote_loop(self.iso, theirs)
            finally:
                os._exit(1)
        theirs.close()
        self.sock, self.pid = ours, pid
        _, self.iso.runs_proc = self._receive(self.SPAWN_LIMIT)  # ("ready", procfs mounted)

    def spawn(self, spec, fds, run_dir, limits, report_fd) -> Child:
        for attempt in range(2):
            try:
                return self._spawn_once(spec, fds, run_dir, limits, report_fd)
            except (OSError, _ZygoteLost):
                if attempt:
                    raise
                self._restart()
        raise AssertionError("unreachable")

    def _spawn_once(self, spec, fds, run_dir, limits, report_fd) -> Child:
        import socket

        # The run's program can be large: it travels in a memfd, read by the child only.
        spec_fd = os.memfd_create("run", os.MFD_CLOEXEC)
        try:
            write_all(spec_fd, pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
            os.lseek(spec_fd, 0, os.SEEK_SET)
            targets, sources = zip(*fds.items())
            request = pickle.dumps(("spawn", targets, run_dir, limits, report_fd))
            socket.send_fds(self.sock, [request], [spec_fd, *sources])
        finally:
            os.close(spec_fd)
        # Its pid is one of the runs' namespace, not ours: the zygote sends a pidfd with it.
        reply, pidfds = self._receive_with_fds(self.SPAWN_LIMIT)
        if reply[0] != "spawned" or len(pidfds) != 1:
            for fd in pidfds:
                os.close(fd)
            raise OSError(errno.EAGAIN, f"the zygote could not fork: {reply[1]}")
        return Child(reply[1], pidfds[0], cpu_limit(limits))

    def end(self, child: Child) -> None:
        try:
            self.sock.send(pickle.dumps(("end",)))
            _, status, cpu_time = self._receive(self.END_LIMIT)
            if child.status is None:
                child.status, child.cpu_time = status, cpu_time
        except (OSError, _ZygoteLost):
            self._restart(child)

    def _receive(self, limit: float) -> tuple:
        reply, fds = self._receive_with_fds(limit)
        for fd in fds:
            os.close(fd)
        return reply

    def _receive_with_fds(self, limit: float) -> tuple[tuple, list[int]]:
        import socket

        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        if not poller.poll(limit * 1000):
            raise _ZygoteLost("no answer")
        message, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 1)
        if not message:
            raise _ZygoteLost("exited")
        return pickle.loads(message), fds

    def _restart(self, run: Child | None = None) -> None:
        """As init of the namespace: kill every other process (zygote and run), reap them all,
        start a fresh zygote."""
        signal_quietly(-1)
        reap_all_children(run)
        self.sock.close()
        self.iso.unmount_runs_proc()
        self.start()


def _zygote_loop(iso: Isolation, sock) -> None:
    """Body of the zygote: fork each run's process on request; end the run on request."""
    import socket

    # A process group of its own, in the runs' namespace: killpg of the parent's group is then
    # a signal to the zygote, not one to the whole run (the worker's group is not visible).
    os.setsid()
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # the worker's handler: no business here
    if not iso.runs_pid_ns:  # as init of the runs' namespace it is their reaper anyway
        iso.libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a run come back here to be reaped
    sock.send(pickle.dumps(("ready", iso.mount_runs_proc())))
    set_per_worker_limits()
    gc.freeze()
    run = None
    while True:
        message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 16)
        if not message:
            return
        request = pickle.loads(message)  # from the worker
        if request[0] == "spawn":
            _, targets, run_dir, limits, report_fd = request
            try:
                pid = fork_without_hooks()
            except OSError as exc:
                pid, error = -1, str(exc)
            if pid == 0:
                fd_map = dict(zip(targets, fds[1:]))
                child_main(iso, fds[0], fd_map, run_dir, limits, report_fd, preset=True)
            for fd in fds:
                os.close(fd)
            run = Child(pid, None, cpu_limit(limits)) if pid > 0 else None
            if run is None:
                sock.send(pickle.dumps(("error", error)))
                continue
            pidfd = os.pidfd_open(pid)
            socket.send_fds(sock, [pickle.dumps(("spawned", pid))], [pidfd])
            os.close(pidfd)
        elif request[0] == "end":
            signal_quietly(-1)  # every process of the run: all others in the namespace but init
            reap_all_children(run)
            status = (run.status, run.cpu_time) if run is not None else (None, 0.0)
            run = None
            sock.send(pickle.dumps(("ended", *status)))
