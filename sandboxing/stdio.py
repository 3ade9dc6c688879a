"""Stdin/stdout tasks in the worker: compile a C++ program (g++, confined like any untrusted
process, with a small cache of binaries), run the program once per test with the test's input
on stdin, drain and cap its output, and classify each run."""

from __future__ import annotations

import collections
import hashlib
import os
import select
import shutil
import time
from typing import TYPE_CHECKING

from .constants import (
    CANDIDATE_ENV,
    COMPILE_FILE_SIZE_LIMIT,
    COMPILE_MIN_MEMORY_MB,
    CPP_COMPILE_COMMAND,
    GRACE_AFTER_EXIT,
)
from .fdio import read_file, write_all, write_file
from .processes import Child, ProgramRun, exit_if_parent_gone, watch_parent
from .verdicts import RunEnded, classify_program_run, compile_outcome

if TYPE_CHECKING:
    from .worker import Worker


class StdioRunner:
    """Runs stdio jobs with the confined processes of one worker."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.binaries: collections.OrderedDict = collections.OrderedDict()  # source hash -> build

    def run(self, job: dict, run_dir: str) -> dict:
        """Compile (C++), then run the program once per test; the reply's verdict fields."""
        limits, tests = job["limits"], job["tests"]
        reply: dict = {"tests_total": len(tests), "tests_passed": 0}
        if job["language"] == "cpp":
            compiled, detail = self._compile_cpp(job["completion"], run_dir, limits)
            reply["compiled"] = compiled
            if not compiled:
                reply.update(status="compile_error", detail=detail)
                return reply
        first_failure = None
        for index, test in enumerate(tests):
            status, detail = self._run_one_test(job, test, run_dir)
            if status == "passed":
                reply["tests_passed"] += 1
                continue
            if first_failure is None:
                where = "" if status == "syntax_error" else f"test {index}: "
                first_failure = (status, where + detail)
            if status in ("timeout", "syntax_error", "infra_error"):
                not_run = len(tests) - index - 1
                if status == "timeout" and not_run:
                    later = "" if first_failure[0] == "timeout" else f"; test {index} timed out"
                    note = f"{later} ({not_run} later tests not run)"
                    first_failure = (first_failure[0], first_failure[1] + note)
                break
        status, detail = first_failure or ("passed", "")
        reply.update(status=status, detail=detail)
        return reply

    def _run_one_test(self, job: dict, test: dict, run_dir: str) -> tuple[str, str]:
        limits = job["limits"]
        child_limits = {"cpu": limits["timeout"] + 1.0, "memory_mb": limits["memory_mb"]}
        if job["language"] == "cpp":
            child_limits["stack"] = min(limits["memory_mb"], 256) << 20  # deep recursion is usual
            binary = os.path.join(run_dir, "main")
            target = ("exec", binary, [binary], run_dir)
        else:
            target = ("python", job["completion"])
        stdin_fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
        try:
            write_all(stdin_fd, test["input"].encode())
            os.lseek(stdin_fd, 0, os.SEEK_SET)
            run = self._run_process(
                target, stdin_fd, run_dir, child_limits, limits["timeout"], limits
            )
        finally:
            os.close(stdin_fd)
        return classify_program_run(run, test["output"], job["tolerance"], limits)

    def _compile_cpp(self, source: str, run_dir: str, limits: dict) -> tuple[bool, str]:
        """g++ -O2 -std=c++17 in the run directory, confined like any untrusted process."""
        key = hashlib.sha256(source.encode()).hexdigest()
        binary_path = os.path.join(run_dir, "main")
        cached = self.binaries.get(key)
        if cached is not None:
            self.binaries.move_to_end(key)
            compiled, payload = cached
            if compiled:
                write_file(binary_path, payload, 0o755)
            return compiled, "" if compiled else payload
        write_file(os.path.join(run_dir, "main.cpp"), source.encode(), 0o644)
        compiler = shutil.which(CPP_COMPILE_COMMAND[0], path=CANDIDATE_ENV["PATH"])
        if compiler is None:
            raise RunEnded("infra_error", "g++ is not installed")
        argv = [*CPP_COMPILE_COMMAND, "-o", "main", "main.cpp"]
        compile_limits = {
            "cpu": limits["compile_timeout"] + 1.0,
            "memory_mb": max(limits["memory_mb"], COMPILE_MIN_MEMORY_MB),
            "file_size": COMPILE_FILE_SIZE_LIMIT,
        }
        run = self._run_process(
            ("exec", compiler, argv, run_dir),
            self.worker.devnull,  # so `#include "/dev/stdin"` reads nothing instead of hanging
            run_dir,
            compile_limits,
            limits["compile_timeout"],
            limits,
        )
        if run.setup_report:
            raise RunEnded(
                "infra_error", f"could not start the compiler: {run.setup_report.decode()}"
            )
        compiled, detail = compile_outcome(run, limits["compile_timeout"])
        payload = b""
        if compiled:
            try:
                payload = read_file(binary_path)
            except OSError:
                compiled, detail = False, "the compiler produced no executable"
        if compiled and len(payload) <= 64 << 20:
            self._remember_binary(key, (True, payload))
        elif not compiled and not run.timed_out:
            self._remember_binary(key, (False, detail))
        return compiled, detail

    def _remember_binary(self, key: str, entry: tuple) -> None:
        self.binaries[key] = entry
        while len(self.binaries) > 16:
            self.binaries.popitem(last=False)

    def _run_process(self, target, stdin_fd, run_dir, child_limits, timeout, limits) -> ProgramRun:
        """Run ``target`` confined; drain its stdout/stderr until it exits or a limit hits."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        run = ProgramRun(limits["output_limit"])
        child = None
        try:
            start = time.monotonic()
            child = self.worker.spawn(
                target,
                {0: stdin_fd, 1: out_w, 2: err_w, 3: report_w},
                run_dir,
                child_limits,
                report_fd=3,
            )
            for fd in (out_w, err_w, report_w):
                os.close(fd)
            out_w = err_w = report_w = -1
            self._drain(child, run, out_r, err_r, report_r, start + timeout)
        finally:
            if child is not None:
                self.worker.kill(child)
                run.status, run.cpu_time, run.cpu_limit = (
                    child.status,
                    child.cpu_time,
                    child.cpu_limit,
                )
            for fd in (out_r, out_w, err_r, err_w, report_r, report_w):
                if fd >= 0:
                    os.close(fd)
        return run

    def _drain(self, child: Child, run: ProgramRun, out_r, err_r, report_r, deadline) -> None:
        """Read the child's pipes until it has exited and they are closed, or a limit hits."""
        sinks = {out_r: run.stdout, err_r: run.stderr, report_r: run.setup_report}
        poller = select.poll()
        for fd in sinks:
            poller.register(fd, select.POLLIN)
        if child.pidfd is not None:
            poller.register(child.pidfd, select.POLLIN)
        watch_parent(poller, self.worker.parent_fd)
        open_fds, exited = set(sinks), False
        while open_fds or not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                run.timed_out = not exited
                return
            step = remaining if child.pidfd is not None else min(remaining, 0.02)
            events = poller.poll(step * 1000)
            exit_if_parent_gone(dict(events), self.worker.parent_fd)
            for fd, _event in events:
                if fd == child.pidfd:
                    poller.unregister(fd)
                    exited = True
                    # Only escaped descendants (fallback mode) keep pipes open now; bounded wait.
                    deadline = min(deadline, time.monotonic() + GRACE_AFTER_EXIT)
                    continue
                data = os.read(fd, 1 << 16)
                if not data:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    continue
                sinks[fd].extend(data)
                if fd != report_r:
                    run.output_bytes += len(data)
                    if run.output_bytes > run.output_limit:
                        run.output_exceeded = True
                        return
            if child.pidfd is None and not exited and child.has_exited():
                exited = True
                deadline = min(deadline, time.monotonic() + GRACE_AFTER_EXIT)
