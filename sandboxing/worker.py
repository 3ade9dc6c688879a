"""The worker process: set up the isolation, start the zygote, probe one run's identity, then
serve jobs from the parent one at a time. A function task's ``check`` runs here, in the trusted
process, against a proxy of the candidate function; stdio tasks go to the stdio runner."""

from __future__ import annotations

import builtins
import collections
import gc
import json
import os
import pickle
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from .constants import PREIMPORTED
from .fdio import read_all
from .isolation import Isolation, cpu_limit
from .kernel import PR_SET_DUMPABLE, fork_without_hooks
from .processes import (
    Child,
    child_main,
    kill_all_descendants,
    reap_all_children,
    reap_strays,
    signal_quietly,
)
from .rpc_trusted import CandidateChannel, CandidateProxy
from .stdio import StdioRunner
from .verdicts import CANDIDATE_DIED, RunEnded, classify_check_exception, classify_death
from .wire import clip, read_frame, write_frame
from .zygote import Zygote


class Worker:
    """Runs jobs inside the isolation set up by :class:`Isolation`."""

    def __init__(self, isolation: Isolation):
        self.iso = isolation
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.test_codes: collections.OrderedDict = collections.OrderedDict()
        self.stdio = StdioRunner(self)
        self.alarm_armed = False
        self.alarm_deadline = 0.0
        signal.signal(signal.SIGALRM, self._on_alarm)
        # Runs share our uid when no second uid could be mapped: then they could signal us.
        # As init we ignore every signal without a handler; SIGINT must not interrupt a check.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        isolation.libc.prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/<pid>/mem, no core
        self.zygote: Zygote | None = None
        self.parent_fd = -1  # hang-up on it while a run is waited for: the parent has died

    def start_zygote(self, close_in_zygote: Sequence[int]) -> None:
        """Only where kill(-1) is safe (we are a namespace's init) and pidfds exist."""
        if not self.iso.pid_ns:
            return
        try:
            os.close(os.pidfd_open(os.getpid()))
        except (AttributeError, OSError):
            return
        self.zygote = Zygote(self.iso, close_in_zygote)

    def _on_alarm(self, signum, frame):
        # Checked against the clock: a SIGALRM sent by someone else before the deadline is moot.
        if self.alarm_armed and time.monotonic() >= self.alarm_deadline - 0.001:
            raise RunEnded("timeout")

    def _arm_alarm(self, deadline: float) -> None:
        """The test's own code may loop: SIGALRM in this trusted process stops it at the limit."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RunEnded("timeout")
        self.alarm_deadline = deadline
        self.alarm_armed = True
        signal.setitimer(signal.ITIMER_REAL, remaining)

    def _disarm_alarm(self) -> None:
        self.alarm_armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    def serve(self, request_fd: int, reply_fd: int) -> None:
        self.parent_fd = request_fd
        while True:
            frame = read_frame(request_fd, 1 << 34)
            if frame is None:  # the parent closed the pipe (or died): stop
                return
            reply = self.run_job(pickle.loads(frame))  # the parent is trusted
            write_frame(reply_fd, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))

    def run_job(self, job: dict) -> dict:
        start = time.monotonic()
        run_dir = None
        try:
            run_dir = self.iso.make_run_dir()
            if job["kind"] == "function":
                reply = self._run_function(job, run_dir, start)
            else:
                reply = self.stdio.run(job, run_dir)
        except RunEnded as ended:  # a fault of ours that the stdio runner names (no compiler...)
            reply = {"status": ended.status, "detail": f"harness error: {ended.detail}"}
        except BaseException as exc:  # a failure of ours (cannot fork, no memory...)
            reply = {"status": "infra_error", "detail": f"harness error: {exc!r}"}
        finally:
            self._disarm_alarm()
        if run_dir is not None:
            try:
                self.iso.remove_run_dir(run_dir)
            except OSError as exc:
                reply = {"status": "infra_error", "detail": f"cleaning up the run failed: {exc}"}
        reap_strays()
        reply["passed"] = reply["status"] == "passed"
        reply["detail"] = clip(reply.get("detail", ""))
        reply["duration"] = round(time.monotonic() - start, 6)
        return reply

    # -- confined children ----------------------------------------------------------------------

    def spawn(
        self,
        spec: tuple,
        fds: dict[int, int],
        run_dir: str,
        limits: dict,
        report_fd: int | None = None,
    ) -> Child:
        """Start a confined child running ``spec`` (see :func:`.processes.run_spec`).

        ``fds`` maps the child's fd numbers to ours; every other fd is closed, so nothing of the
        worker's channel to the parent exists in the child. A set-up failure is written to
        ``report_fd`` (a child fd number, closed on exec) before any untrusted code runs."""
        if self.zygote is not None:
            return self.zygote.spawn(spec, fds, run_dir, limits, report_fd)
        pid = fork_without_hooks()
        if pid == 0:
            child_main(self.iso, spec, fds, run_dir, limits, report_fd, preset=False)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        return Child(pid, pidfd, cpu_limit(limits))

    def kill(self, child: Child) -> None:
        """End a run: SIGKILL every process of it and reap them all."""
        if self.zygote is not None:
            self.zygote.end(child)
        elif self.iso.pid_ns:
            # We are the init of our PID namespace and the run's processes are the only others
            # in it: kill(-1) reaches every one at once (fork fails for a process being killed),
            # however it detached (setsid, double fork, posix_spawn).
            signal_quietly(-1)
            reap_all_children(child)
        else:
            if child.status is None:
                signal_quietly(child.pid)
                signal_quietly(-child.pid)  # its process group (it called setsid)
                _, status, usage = os.wait4(child.pid, 0)
                child.record(status, usage)
            kill_all_descendants()
        if child.pidfd is not None:
            os.close(child.pidfd)
            child.pidfd = None

    # -- function tasks -------------------------------------------------------------------------

    def _run_function(self, job: dict, run_dir: str, start: float) -> dict:
        limits = job["limits"]
        deadline = start + limits["timeout"]
        call_r, call_w = os.pipe2(os.O_CLOEXEC)
        reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        program = job["prompt"] + job["completion"]
        entry_point = job["entry_point"]
        child = None
        try:
            child = self.spawn(
                ("function", program, entry_point),
                {0: self.devnull, 1: out_w, 2: out_w, 3: call_r, 4: reply_w},
                run_dir,
                {"cpu": limits["timeout"] + 1.0, "memory_mb": limits["memory_mb"]},
            )
            for fd in (call_r, reply_w, out_w):
                os.close(fd)
            call_r = reply_w = out_w = -1
            channel = CandidateChannel(
                call_w, reply_r, out_r, child, deadline, limits["output_limit"], self.parent_fd
            )
            status, detail = self._check(job, channel, deadline)
        finally:
            self._disarm_alarm()
            if child is not None:
                self.kill(child)
            for fd in (call_r, call_w, reply_r, reply_w, out_r, out_w):
                if fd >= 0:
                    os.close(fd)
        if status == CANDIDATE_DIED:
            status, detail = classify_death(child, channel.output_tail())
        return {"status": status, "detail": detail}

    def _check(self, job: dict, channel: CandidateChannel, deadline: float) -> tuple[str, str]:
        """Run the task's check(candidate) here, in the trusted process, against the proxy."""
        test_lines: list[str] = []
        try:
            self._arm_alarm(deadline)
            channel.expect_setup()
            prompt_code, test_code, test_lines = self._test_codes(job)
            env = _check_globals(prompt_code)
            proxy = CandidateProxy(job["entry_point"], channel)
            env[job["entry_point"]] = proxy
            try:
                exec(test_code, env)
            except Exception as exc:
                raise RunEnded("infra_error", f"the task's test code failed: {exc!r}") from None
            check = env.get("check")
            if not callable(check):
                raise RunEnded("infra_error", "the task's test code defines no check(candidate)")
            channel.wait_loaded()
            check(proxy)
            self._disarm_alarm()
            return "passed", ""
        except RunEnded as ended:
            if ended.status == "timeout":
                return "timeout", f"time limit of {job['limits']['timeout']:g} s exceeded"
            return ended.status, ended.detail
        except BaseException as exc:
            return classify_check_exception(exc, test_lines)
        finally:
            self._disarm_alarm()

    def _test_codes(self, job: dict) -> tuple:
        """Compiled prompt (None if it does not compile alone), test, and the test's lines."""
        key = (job["prompt"], job["test"])
        cached = self.test_codes.get(key)
        if cached is not None:
            self.test_codes.move_to_end(key)
            return cached
        try:
            prompt_code = compile(job["prompt"], "<prompt>", "exec")
        except (SyntaxError, ValueError):  # e.g. a prompt that ends in "def f(x):"
            prompt_code = None
        try:
            test_code = compile(job["test"], "<test>", "exec")
        except (SyntaxError, ValueError) as exc:
            raise RunEnded("infra_error", f"the task's test code does not compile: {exc}") from None
        cached = (prompt_code, test_code, job["test"].splitlines())
        self.test_codes[key] = cached
        if len(self.test_codes) > 1024:
            self.test_codes.popitem(last=False)
        return cached


def _check_globals(prompt_code) -> dict:
    """Globals for the trusted check: the prompt's helpers (poly, encode_cyclic...) if it runs."""
    env: dict[str, Any] = {"__name__": "__check__", "__builtins__": builtins}
    if prompt_code is not None:
        try:
            exec(prompt_code, env)
        except Exception:  # continue without the helpers
            env = {"__name__": "__check__", "__builtins__": builtins}
    return env


def _probe_child(worker: Worker) -> dict:
    """Start one run's process the normal way and read back who it is."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    run_dir = worker.iso.make_run_dir()
    try:
        child = worker.spawn(
            ("probe", 4),
            {0: worker.devnull, 1: worker.devnull, 2: worker.devnull, 4: write_fd},
            run_dir,
            {"cpu": 5.0, "memory_mb": 1024},
        )
        os.close(write_fd)
        data = read_all(read_fd)
        worker.kill(child)
    finally:
        os.close(read_fd)
        worker.iso.remove_run_dir(run_dir)
    if not data:
        raise RuntimeError("the isolation probe child failed")
    return json.loads(data)


def _finish_site_set_up(site_packages: Sequence[str]) -> None:
    """What ``site`` gives a normal interpreter, for a worker started with -S (to stay small):
    the site-packages on sys.path (their .pth hooks are not run) and the ``exit``, ``quit``,
    ``help``... builtins that programs use."""
    import site  # with -S its import does nothing more than define its functions

    sys.path.extend(p for p in site_packages if p not in sys.path)
    site.setquit()
    site.setcopyright()
    site.sethelper()


def worker_main(options_json: str) -> None:
    options = json.loads(options_json)
    request_fd, reply_fd = options["request_fd"], options["reply_fd"]
    _finish_site_set_up(options.get("site_packages", ()))
    for fd in (request_fd, reply_fd):
        os.set_inheritable(fd, False)
    try:
        isolation = Isolation(
            options["isolation"], options.get("prefixes", ()), options.get("switched_off", ())
        )
        isolation.enter(keep_fds=(request_fd, reply_fd))
        for name in PREIMPORTED:
            __import__(name)
        worker = Worker(isolation)
        worker.start_zygote(close_in_zygote=(request_fd, reply_fd))
        probe = _probe_child(worker)
        if probe["cap_eff"].strip("0") or probe["no_new_privs"] != "1":
            raise RuntimeError(f"untrusted children would keep privileges: {probe}")
        hello = isolation.describe(probe)
    except BaseException as exc:
        write_frame(reply_fd, pickle.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise
    write_frame(reply_fd, pickle.dumps(hello))
    gc.freeze()  # forked runs never touch (and so copy) the worker's objects when collecting
    worker.serve(request_fd, reply_fd)


def main(argv: Sequence[str]) -> int:
    """Entry point of a worker process: ``--worker OPTIONS_JSON`` (see the pool's bootstrap)."""
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: --worker OPTIONS_JSON (started by sandbox.Sandbox)", file=sys.stderr)
        return 2
    worker_main(argv[1])
    return 0
