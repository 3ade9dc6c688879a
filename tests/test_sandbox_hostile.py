"""Hostile and buggy programs in sandbox.py.

All cases run as ONE batch, interleaved with honest jobs, on a 2-worker sandbox. For every case
the test checks: the verdict, that the harness returned within the time limit plus about 2 s, that
no process of the run survives (each spawned process carries a marker in its command line or name,
and /proc is scanned right after the batch), that files outside the workspace are untouched, and
that the honest jobs of the same batch got their own correct verdicts.

The containment checks made one at a time (limits, the file system, signals, an interpreter under
/tmp, the zygote) are in tests/test_sandbox_containment.py.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import pytest

from sandbox import Sandbox
from sandboxing.pool import worker_processes
from tests.helpers import (
    MARKER,
    SLACK,
    SPAWN_SLEEPER,
    TIMEOUT,
    descendants,
    function_task,
    marked_processes,
)

COMPILE_TIMEOUT = 8.0
CANARY = "CODERL_SANDBOX_CANARY"
os.environ[CANARY] = "parent-secret"  # before any Sandbox starts: it must not reach a run


@dataclass
class Case:
    name: str
    task: dict
    completion: str
    status: str
    budget: float = TIMEOUT + SLACK  # seconds the run may take, harness included
    needs: str = ""  # a layer describe() must report for this verdict to be the expected one


def cpp_task(cases=(("3\n", "6\n"), ("5\n", "10\n"))) -> dict:
    tests = [{"input": i, "output": o} for i, o in cases]
    return {"task_id": "hostile/cpp", "prompt": "", "language": "cpp", "tests": tests}


ABS_TEST = "def check(candidate):\n    assert abs(candidate(2) - 4) < 1e-9\n"
CPP_BUDGET = COMPILE_TIMEOUT + TIMEOUT + SLACK


def python_cases(victim: str, port: int) -> list[Case]:
    host_writes = (
        "    import os\n"
        f"    for path in [{victim!r}, '/dev/shm/{MARKER}',\n"
        f"                 '/var/tmp/{MARKER}', '/tmp/{MARKER}']:\n"
        "        try:\n"
        "            with open(path, 'w') as handle:\n"
        "                handle.write('pwned')\n"
        "        except OSError:\n"
        "            pass\n"
        "    return x * 2\n"
    )
    return [
        Case(
            "catch-BaseException-around-sleep",
            function_task(),
            "    import time\n    while True:\n        try:\n            time.sleep(5)\n"
            "        except BaseException:\n            pass\n",
            "timeout",
        ),
        Case(
            "ignore-SIGALRM",
            function_task(),
            "    import signal\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
            "    signal.alarm(1)\n    while True:\n        pass\n",
            "timeout",
        ),
        Case(
            "long-C-level-call-product",
            function_task(),
            "    import collections, itertools\n"
            "    collections.deque(itertools.product(range(10**4), repeat=3), maxlen=0)\n",
            "timeout",
        ),
        Case(
            "catastrophic-regex",
            function_task(),
            "    import re\n    return re.match(r'(a+)+$', 'a' * 64 + 'b')\n",
            "timeout",
        ),
        Case(
            "eq-always-true",
            function_task(),
            "    return Anything()\n\nclass Anything:\n    def __eq__(self, other):\n"
            "        return True\n",
            "failed",
        ),
        Case(
            "patch-builtins-abs",
            function_task(ABS_TEST),
            "    import builtins\n    builtins.abs = lambda value: 0\n    return -1\n",
            "failed",
        ),
        Case(
            "sys-exit-at-top",
            function_task(),
            "    return x * 2\nimport sys\nsys.exit(0)\n",
            "runtime_error",
        ),
        Case(
            "os-_exit-at-top",
            function_task(),
            "    return x * 2\nimport os\nos._exit(0)\n",
            "runtime_error",
        ),
        Case("exit-at-top", function_task(), "    return x * 2\nexit()\n", "runtime_error"),
        Case(
            "raise-SystemExit-inside", function_task(), "    raise SystemExit(0)\n", "runtime_error"
        ),
        Case(
            "kill-parent",
            function_task(),
            "    return x * 2\nimport os\nos.kill(os.getppid(), 9)\n",
            "runtime_error",  # PermissionError: the parent (the zygote) runs as another uid
            needs="uid 65534",
        ),
        Case(
            "kill-parent-then-answer",
            function_task(),
            "    import os\n    try:\n        os.kill(os.getppid(), 9)\n    except OSError:\n"
            "        pass\n    return x * 2\n",
            "passed",
        ),
        Case(
            "bounded-fork-loop",
            function_task(),
            "    import os\n    for _ in range(20):\n        try:\n            pid = os.fork()\n"
            "        except OSError:\n            break\n        if pid == 0:\n"
            f"            {SPAWN_SLEEPER}\n    return x * 2\n",
            "passed",
        ),
        Case(
            "setsid-grandchild-sleeps",
            function_task(),
            "    import os\n    if os.fork() == 0:\n        os.setsid()\n"
            "        if os.fork() == 0:\n"
            f"            {SPAWN_SLEEPER}\n        os._exit(0)\n    return x * 2\n",
            "passed",
        ),
        Case(
            "posix_spawn-child",
            function_task(),
            f"    import os\n    os.posix_spawn('/bin/sleep', ['{MARKER}', '300'], {{}})\n"
            "    return x * 2\n",
            "passed",
        ),
        Case(
            "allocate-8-GB",
            function_task(),
            "    block = bytearray(8 << 30)\n    return x * 2\n",
            "memory_limit",
        ),
        Case(
            "print-forever",
            function_task(),
            "    while True:\n        print('y' * 80)\n",
            "output_limit",
        ),
        Case(
            "write-passed-to-fd-1-and-exit",
            function_task(),
            "    import os\n    os.write(1, b'passed\\n')\n    os._exit(0)\n",
            "runtime_error",
        ),
        Case("input-without-input", function_task(), "    return int(input())\n", "runtime_error"),
        Case(
            "deep-recursion-segfault",
            function_task(),
            # Python-to-Python calls do not use the C stack in 3.11: recurse through map().
            "    import sys\n    sys.setrecursionlimit(10**8)\n    def dive(n):\n"
            "        return list(map(dive, [n + 1]))\n    return dive(0)\n",
            "runtime_error",
        ),
        Case(
            "non-daemon-thread-left-sleeping",
            function_task(),
            "    import threading, time\n"
            "    threading.Thread(target=time.sleep, args=(300,)).start()\n    return x * 2\n",
            "passed",
            budget=TIMEOUT,  # the sleeping thread must not hold the worker
        ),
        Case("write-host-files", function_task(), host_writes, "passed", needs="read-only root"),
        Case(
            "network",
            function_task("def check(candidate):\n    assert candidate(2) is False\n"),
            "    import socket\n    try:\n"
            f"        socket.create_connection(('127.0.0.1', {port}), timeout=0.5).close()\n"
            "        return True\n    except OSError:\n        return False\n",
            "passed",
            needs="network namespace (",
        ),
        Case(
            "environment-scrubbed",
            function_task("def check(candidate):\n    assert candidate(2) == []\n"),
            f"    import os\n    return [k for k in os.environ if k == {CANARY!r}]\n",
            "passed",
        ),
    ]


def cpp_cases() -> list[Case]:
    name_self = (
        f'#include <sys/prctl.h>\nstatic void mark() {{ prctl(PR_SET_NAME, "{MARKER}"); }}\n'
    )
    return [
        Case(
            "cpp-include-dev-stdin",
            cpp_task(),
            '#include "/dev/stdin"\n',
            "compile_error",
            CPP_BUDGET,
        ),
        Case(
            "cpp-infinite-loop-ignoring-SIGTERM",
            cpp_task(),
            "#include <csignal>\nint main() { signal(SIGTERM, SIG_IGN); volatile long x = 0;"
            " for (;;) x++; }\n",
            "timeout",
            CPP_BUDGET,
        ),
        Case(
            "cpp-fork-loop",
            cpp_task(),
            name_self + "#include <unistd.h>\nint main() { mark(); for (;;) fork(); }\n",
            "timeout",
            CPP_BUDGET,
        ),
        Case(
            "cpp-puts-forever",
            cpp_task(),
            '#include <cstdio>\nint main() { for (;;) puts("x"); }\n',
            "output_limit",
            CPP_BUDGET,
        ),
        Case(
            "cpp-5e9-element-vector",
            cpp_task(),
            "#include <vector>\n#include <cstdio>\nint main() { std::vector<int> v(5000000000LL);"
            ' printf("%d\\n", v[7]); }\n',
            "memory_limit",
            CPP_BUDGET,
        ),
        Case(
            "cpp-exit-after-half-the-answer",
            cpp_task([("2\n", "4\n4\n")]),
            '#include <cstdio>\n#include <cstdlib>\nint main() { printf("4\\n"); fflush(stdout);'
            ' exit(0); printf("4\\n"); }\n',
            "failed",
            CPP_BUDGET,
        ),
        Case(
            "cpp-correct-with-CRLF-and-trailing-spaces",
            cpp_task(),
            '#include <cstdio>\nint main() { long long n; scanf("%lld", &n);'
            ' printf("%lld   \\r\\n\\r\\n", 2 * n); }\n',
            "passed",
            CPP_BUDGET,
        ),
        Case(
            "cpp-template-blow-up",
            cpp_task(),
            "template <int D, int I> struct T {\n"
            "  enum { v = T<D - 1, 2 * I>::v + T<D - 1, 2 * I + 1>::v };"
            " };\ntemplate <int I> struct T<0, I> { enum { v = 1 }; };\n"
            "int main() { return T<26, 0>::v; }\n",
            "compile_error",
            COMPILE_TIMEOUT + SLACK,
        ),
    ]


HONEST = [
    (function_task(), "    return x * 2\n", "passed"),
    (function_task(), "    return x + 3\n", "failed"),
    (
        cpp_task(),
        '#include <cstdio>\nint main() { int n; scanf("%d", &n); printf("%d\\n", 2 * n); }\n',
        "passed",
    ),
]


def worker_trees(box: Sandbox) -> list[list[str]]:
    """For each worker: every process below the one the parent started (the worker, its
    zygote, and whatever a run left behind), with its PID namespace and command line."""
    trees = []
    for process in worker_processes(box):
        tree = []
        for pid in descendants(process.pid):
            try:
                namespace = os.readlink(f"/proc/{pid}/ns/pid")
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    tree.append(f"{pid} {namespace}: {cmdline.read()[:60]!r}")
            except OSError:
                continue
        trees.append(tree)
    return trees


@pytest.fixture(scope="module")
def hostile_batch(tmp_path_factory):
    victim = tmp_path_factory.mktemp("host") / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o666)  # writable by anyone who can reach it
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    cases = python_cases(str(victim), listener.getsockname()[1]) + cpp_cases()
    jobs, expected = [], []
    for i, case in enumerate(cases):
        jobs.append((case.task, case.completion))
        expected.append(case)
        task, completion, status = HONEST[i % len(HONEST)]
        jobs.append((task, completion))
        expected.append(Case(f"honest-{i}", task, completion, status, CPP_BUDGET))
    with Sandbox(workers=2, timeout=TIMEOUT, compile_timeout=COMPILE_TIMEOUT, cache=False) as box:
        start = time.monotonic()
        results = box.run_batch(jobs)
        elapsed = time.monotonic() - start
        survivors = marked_processes()  # right away: nothing may be left, not even briefly
        trees = worker_trees(box)
        describe = box.describe()
    try:
        connection, _ = listener.accept()
        connection.close()
        network_reached = True
    except BlockingIOError:
        network_reached = False
    listener.close()
    yield {
        "results": {case.name: (case, result) for case, result in zip(expected, results)},
        "elapsed": elapsed,
        "survivors": survivors,
        "worker_trees": trees,
        "victim": victim,
        "network_reached": network_reached,
        "describe": describe,
    }
    for path in (f"/dev/shm/{MARKER}", f"/var/tmp/{MARKER}", f"/tmp/{MARKER}"):
        if os.path.exists(path):
            os.remove(path)


CASE_NAMES = [c.name for c in python_cases("/nowhere", 1) + cpp_cases()]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_case_gets_its_verdict_in_time(hostile_batch, name):
    case, result = hostile_batch["results"][name]
    if case.needs not in hostile_batch["describe"]:
        pytest.skip(f"the expected verdict relies on {case.needs!r}, not active here")
    assert result.status == case.status, (name, result)
    assert result.passed == (case.status == "passed")
    assert result.duration <= case.budget, (name, result.duration)


def test_honest_jobs_in_the_same_batch_are_unaffected(hostile_batch):
    honest = {k: v for k, v in hostile_batch["results"].items() if k.startswith("honest-")}
    assert len(honest) == len(CASE_NAMES)
    for name, (case, result) in honest.items():
        assert result.status == case.status, (name, result)


def test_specific_details(hostile_batch):
    results = {name: result for name, (_, result) in hostile_batch["results"].items()}
    assert "not plain data" in results["eq-always-true"].detail
    assert "SIGSEGV" in results["deep-recursion-segfault"].detail
    assert "exit" in results["sys-exit-at-top"].detail
    assert "status 0" in results["os-_exit-at-top"].detail
    assert "EOFError" in results["input-without-input"].detail
    assert "bad_alloc" in results["cpp-5e9-element-vector"].detail
    assert results["cpp-exit-after-half-the-answer"].tests_passed == 0
    assert results["cpp-correct-with-CRLF-and-trailing-spaces"].tests_passed == 2
    assert results["cpp-template-blow-up"].compiled is False


def test_no_process_of_any_run_survives(hostile_batch):
    assert hostile_batch["survivors"] == []
    assert marked_processes() == []
    if "PID namespace (" in hostile_batch["describe"]:
        # Below each worker: its zygote, and nothing else.
        trees = hostile_batch["worker_trees"]
        assert [len(tree) for tree in trees] == [2, 2], trees


def test_files_outside_the_workspace_are_untouched(hostile_batch):
    if "read-only root" not in hostile_batch["describe"]:
        pytest.skip("no private read-only file system here (reported by describe())")
    assert hostile_batch["victim"].read_text() == "original"
    for path in (f"/dev/shm/{MARKER}", f"/var/tmp/{MARKER}", f"/tmp/{MARKER}"):
        assert not os.path.exists(path), path


def test_network_was_not_reachable(hostile_batch):
    if "no network namespace" in hostile_batch["describe"]:
        pytest.skip("this kernel gives no network namespace (reported by describe())")
    assert hostile_batch["network_reached"] is False


def test_the_whole_batch_took_bounded_time(hostile_batch):
    # 12 runs end at a time limit; two workers; compiles are bounded by COMPILE_TIMEOUT.
    assert hostile_batch["elapsed"] < 60
