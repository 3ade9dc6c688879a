"""The parent's side: the Sandbox (a pool of warm worker processes fed from one queue, and the
result cache), batches and their futures, and the handle on each worker process (its start-up,
the job and reply frames, restarts)."""

from __future__ import annotations

import collections
import json
import logging
import os
import pickle
import queue
import select
import sys
import threading
import time
import weakref
from collections.abc import Sequence

from .constants import CANDIDATE_ENV, SWITCH_OFF_ENV
from .jobs import make_job, reply_wait_limit
from .verdicts import Result, infra_result
from .wire import FrameTooLarge, plain_loads, read_frame, write_frame

_log = logging.getLogger("sandbox")


class Sandbox:
    """A warm pool of isolated workers running (task, completion) jobs; see sandbox.py's
    docstring for how a verdict is reached and what the containment covers.

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
        limits = {
            "timeout": self.timeout,
            "memory_mb": self.memory_mb,
            "compile_timeout": self.compile_timeout,
            "output_limit": self.output_limit,
        }
        return make_job(task, completion, limits)

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
                result = infra_result(f"harness error: {type(exc).__name__}: {exc}")
            self._cache_put(job["key"], result)
            batch.deliver(indices, result)

    def _execute(self, handle: _WorkerHandle, job: dict) -> Result:
        """Run one job; a harness fault (worker lost, infra_error) is retried once."""
        result = infra_result("not run")
        for _attempt in range(2):
            try:
                reply = handle.request(job, reply_wait_limit(job))
            except _WorkerLost as lost:
                handle.restart()
                result = infra_result(f"sandbox worker lost: {lost}")
                continue
            result = Result(**reply)
            if result.status != "infra_error":
                break
        return result


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
# The descriptions this process has logged: each is logged once (a test clears it to see that).
LOGGED_DESCRIPTIONS: set[str] = set()


def worker_processes(box: Sandbox) -> list:
    """The worker processes (``subprocess.Popen``) of ``box``, for tests: killing one stands for
    a fault of the harness in the middle of a job."""
    return [handle.process for handle in box._workers]


def _log_description_once(description: str, hello: dict) -> None:
    if description in LOGGED_DESCRIPTIONS:
        return
    LOGGED_DESCRIPTIONS.add(description)
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


_PACKAGE = __name__.rpartition(".")[0]
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Loads this package from its directory (its modules' cached bytecode) without putting the
# project on sys.path, whose entries become part of the runs' visible tree, and imports every
# module of it at once: after the worker pivots into its minimal root the directory is gone.
_WORKER_BOOTSTRAP = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location({_PACKAGE!r}, "
    f"{os.path.join(_PACKAGE_DIR, '__init__.py')!r}, "
    f"submodule_search_locations=[{_PACKAGE_DIR!r}])\n"
    f"package = sys.modules[{_PACKAGE!r}] = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(package)\n"
    "package.import_all()\n"
    f"sys.exit(sys.modules['{_PACKAGE}.worker'].main(sys.argv[1:]))\n"
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
                "switched_off": os.environ.get(SWITCH_OFF_ENV, "").replace(",", " ").split(),
            }
        )
        try:
            # Every fork of a run copies the page tables of the worker's memory, so it is kept
            # small: -S skips site's start-up (its .pth hooks import a few MiB of modules; the
            # site-packages go on sys.path instead), and importing the package, rather than
            # running a script, uses its modules' cached bytecode instead of compiling them,
            # which leaves a heap several MiB larger.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WORKER_BOOTSTRAP, "--worker", options],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(request_r, reply_w),
                cwd="/",
                env=dict(CANDIDATE_ENV),  # runs inherit it: nothing of ours reaches them
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
            write_frame(self.request_fd, pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            raise _WorkerLost(f"cannot send the job ({exc})") from None
        return self._read_reply(limit)

    def _read_reply(self, limit: float) -> dict:
        poller = select.poll()
        poller.register(self.reply_fd, select.POLLIN)
        if not poller.poll(limit * 1000):
            raise _WorkerLost(f"no reply within {limit:.0f} s")
        try:
            frame = read_frame(self.reply_fd, 1 << 30)
        except (OSError, FrameTooLarge) as exc:
            raise _WorkerLost(f"broken reply ({exc})") from None
        if frame is None:
            raise _WorkerLost("the worker process exited")
        try:
            reply = plain_loads(frame)
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
