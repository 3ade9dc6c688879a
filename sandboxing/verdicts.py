"""Verdicts: the result record, and how a run's trusted records (exit status, CPU time,
output, the exception that escaped ``check``) become one of VERDICTS."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import traceback
from typing import TYPE_CHECKING, Any

from .constants import EXIT_MEMORY
from .wire import clip

if TYPE_CHECKING:
    from .processes import Child, ProgramRun

VERDICTS = (
    "passed",
    "failed",
    "syntax_error",
    "compile_error",
    "runtime_error",
    "timeout",
    "memory_limit",
    "output_limit",
    "infra_error",
)


@dataclasses.dataclass(frozen=True)
class Result:
    """The verdict of one (task, completion) run."""

    status: str  # one of VERDICTS
    passed: bool  # status == "passed"
    tests_passed: int | None = None  # stdio tasks: tests passed / total (None for function tasks)
    tests_total: int | None = None
    compiled: bool | None = None  # C++ only: did g++ succeed
    detail: str = ""  # short human-readable reason (first failing assertion, error line...)
    duration: float = 0.0  # wall seconds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def infra_result(detail: str) -> Result:
    return Result("infra_error", False, detail=clip(detail))


CANDIDATE_DIED = "candidate_died"  # not a verdict: why is read from the exit status afterwards


class RunEnded(BaseException):
    """Ends the check of a function task with ``status`` (one of VERDICTS, or CANDIDATE_DIED)
    and ``detail``; raised in the trusted worker only. A BaseException, so that an ``except
    Exception`` in the task's test code cannot swallow it. A timeout's detail is filled in by
    the worker, which knows the limit."""

    def __init__(self, status: str, detail: str = ""):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _hit_cpu_limit(status: int, cpu_time: float, cpu_limit: int) -> bool:
    sig = os.WTERMSIG(status)
    return sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_time >= cpu_limit - 0.5)


def classify_death(child: Child, output_tail: str) -> tuple[str, str]:
    """Why the untrusted process of a function task ended during the tests (trusted records)."""
    status = child.status
    if status is None:
        return "runtime_error", "the program ended unexpectedly"
    if os.WIFSIGNALED(status):
        if _hit_cpu_limit(status, child.cpu_time, child.cpu_limit):
            return "timeout", f"CPU time limit of {child.cpu_limit} s exceeded"
        sig = os.WTERMSIG(status)
        if sig == signal.SIGSEGV:
            return "runtime_error", "crashed with SIGSEGV (segmentation fault, e.g. stack overflow)"
        return "runtime_error", f"killed by {_signal_name(sig)}"
    code = os.WEXITSTATUS(status)
    if code == EXIT_MEMORY or "MemoryError" in output_tail:
        return "memory_limit", "MemoryError"
    return "runtime_error", f"the program exited (status {code}) while it was being tested"


def classify_program_run(run: ProgramRun, expected: str, tolerance, limits) -> tuple[str, str]:
    report = bytes(run.setup_report).decode(errors="replace")
    if report.startswith("syntax:"):
        return "syntax_error", report[len("syntax:") :]
    if report:
        return "infra_error", f"could not start the program: {report}"
    if run.output_exceeded:
        return "output_limit", f"output exceeded {run.output_limit} bytes"
    if run.timed_out:
        return "timeout", f"time limit of {limits['timeout']:g} s exceeded"
    stderr = run.stderr_text()
    last_line = clip(stderr.strip().splitlines()[-1]) if stderr.strip() else ""
    suffix = f": {last_line}" if last_line else ""
    out_of_memory = "bad_alloc" in stderr or "MemoryError" in stderr
    status = run.status
    if status is not None and os.WIFSIGNALED(status):
        if _hit_cpu_limit(status, run.cpu_time, run.cpu_limit):
            return "timeout", f"CPU time limit of {run.cpu_limit} s exceeded"
        if out_of_memory:
            return "memory_limit", last_line or "out of memory"
        return "runtime_error", f"killed by {_signal_name(os.WTERMSIG(status))}{suffix}"
    code = os.WEXITSTATUS(status) if status is not None else -1
    if code == EXIT_MEMORY or (code != 0 and out_of_memory):
        return "memory_limit", last_line or "out of memory"
    if code != 0:
        return "runtime_error", f"exit status {code}{suffix}"
    if outputs_match(bytes(run.stdout), expected, tolerance):
        return "passed", ""
    return "failed", _first_difference(bytes(run.stdout), expected)


def compile_outcome(run: ProgramRun, compile_timeout: float) -> tuple[bool, str]:
    if run.timed_out:
        return False, f"compilation exceeded the time limit of {compile_timeout:g} s"
    if run.output_exceeded:
        return False, "compiler messages exceeded the output limit"
    status = run.status
    if status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return True, ""
    stderr = run.stderr_text()
    lines = stderr.splitlines()
    errors = [line for line in lines if "error" in line and not line.startswith("collect2")]
    errors += [line for line in lines if "undefined reference" in line or "error" in line]
    if errors:
        return False, clip(errors[0])
    if status is not None and os.WIFSIGNALED(status):
        if _hit_cpu_limit(status, run.cpu_time, run.cpu_limit):
            return False, f"compilation exceeded the time limit of {compile_timeout:g} s"
        return False, f"the compiler was killed by {_signal_name(os.WTERMSIG(status))}"
    return False, clip(stderr.strip().splitlines()[-1]) if stderr.strip() else "g++ failed"


def outputs_match(actual: bytes, expected: str, tolerance: float | None) -> bool:
    """Token-by-token comparison on whitespace; numbers may differ by ``tolerance`` (abs or rel)."""
    got, want = actual.split(), expected.encode().split()
    if len(got) != len(want):
        return False
    if tolerance is None:
        return got == want
    return all(a == b or _numbers_close(a, b, tolerance) for a, b in zip(got, want))


def _numbers_close(a: bytes, b: bytes, tolerance: float) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if not (math.isfinite(x) and math.isfinite(y)):
        return False
    return abs(x - y) <= tolerance * max(1.0, abs(y))


def _first_difference(actual: bytes, expected: str) -> str:
    got, want = actual.split(), expected.encode().split()
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            shown_a, shown_b = a.decode(errors="replace")[:40], b.decode(errors="replace")[:40]
            return f"wrong answer: token {i} is {shown_a!r}, expected {shown_b!r}"
    if len(got) < len(want):
        return f"wrong answer: the output ended after {len(got)} of {len(want)} tokens"
    return f"wrong answer: {len(got) - len(want)} tokens more than expected"


def classify_check_exception(exc: BaseException, test_lines: list[str]) -> tuple[str, str]:
    """An exception escaped check(): raised by the candidate (runtime_error) or by the test's
    own code (failed)."""
    candidate_detail = getattr(exc, "_candidate_detail", None)
    if candidate_detail is not None:
        if isinstance(exc, MemoryError):
            return "memory_limit", "MemoryError raised by the program"
        return "runtime_error", candidate_detail
    if isinstance(exc, MemoryError):
        return "memory_limit", "MemoryError while checking the program's answers"
    line = _failing_test_line(exc, test_lines)
    message = _safe_str(exc)
    if isinstance(exc, AssertionError):
        detail = line or "assertion failed"
        return "failed", f"{detail}: {message}" if message else detail
    where = f" at: {line}" if line else ""
    return "failed", f"{type(exc).__name__}: {message}{where}"


def _failing_test_line(exc: BaseException, test_lines: list[str]) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<test>"]
    if not frames or not frames[-1].lineno or frames[-1].lineno > len(test_lines):
        return ""
    return test_lines[frames[-1].lineno - 1].strip()


def _safe_str(value: Any) -> str:
    try:
        return clip(str(value), 200)
    except Exception:
        return "<unprintable>"
