"""HumanEval split and the hub row converters, on fixture rows shaped like the real ones (offline).

Converted tasks are executed here without the project's sandbox: each program is
``prompt + completion + test + check(entry_point)`` run by a separate Python process, so a
converter that drops ``check`` or breaks indentation fails these tests.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import coderl.hub_data as hub_data
from coderl.errors import UserError
from coderl.hub_data import (
    code_contests_row_to_task,
    convert_rows,
    deepcoder_row_to_task,
    load_hub_rows,
    load_hub_tasks,
    load_humaneval,
    mbpp_row_to_task,
    split_humaneval,
)
from tests.helpers import run_function_tasks

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_rows(name: str):
    return json.loads((FIXTURES / name).read_text())


# ---------------------------------------------------------------------------------------------
# HumanEval


def test_humaneval_has_164_python_tasks():
    tasks = load_humaneval()
    assert len(tasks) == 164
    assert {task["language"] for task in tasks} == {"python"}
    assert tasks[0]["task_id"] == "HumanEval/0"
    assert tasks[0]["entry_point"] == "has_close_elements"


def test_humaneval_split_is_the_seeded_shuffle_131_33_disjoint_and_repeatable():
    tasks = load_humaneval()
    train, test = split_humaneval(tasks)
    assert (len(train), len(test)) == (131, 33)
    order = list(range(164))
    random.Random(42).shuffle(order)
    assert [t["task_id"] for t in test] == [f"HumanEval/{i}" for i in order[131:]]
    assert [t["task_id"] for t in train] == [f"HumanEval/{i}" for i in order[:131]]
    ids_train, ids_test = {t["task_id"] for t in train}, {t["task_id"] for t in test}
    assert not ids_train & ids_test
    assert len(ids_train | ids_test) == 164
    assert split_humaneval(load_humaneval()) == (train, test)
    assert [t["task_id"] for t in split_humaneval(tasks, seed=1)[1]] != [t["task_id"] for t in test]


def test_humaneval_split_rejects_a_test_size_that_leaves_nothing():
    with pytest.raises(UserError, match="between 1 and 163"):
        split_humaneval(load_humaneval(), test_size=164)


# ---------------------------------------------------------------------------------------------
# MBPP


def test_mbpp_full_row_becomes_humaneval_shaped_task_with_exact_fields():
    task = mbpp_row_to_task(fixture_rows("mbpp_full_rows.json")[0])
    assert task == {
        "task_id": "MBPP/2",
        "prompt": (
            "def similar_elements(test_tup1, test_tup2):\n"
            '    """Write a function to find the similar elements from the given two tuple lists.\n'
            "    assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
            '    """\n'
        ),
        "entry_point": "similar_elements",
        "canonical_solution": (
            "    res = tuple(set(test_tup1) & set(test_tup2))\n    return res\n"
        ),
        "test": (
            "\n\ndef check(candidate):\n"
            "    similar_elements = candidate\n"
            "    assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
            "    assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
            "    assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n"
        ),
        "language": "python",
    }


def test_mbpp_imports_helpers_and_tabs_are_normalised():
    tasks, _ = convert_rows(fixture_rows("mbpp_full_rows.json"), mbpp_row_to_task)
    by_id = {task["task_id"]: task for task in tasks}
    assert by_id["MBPP/3"]["prompt"].startswith("import math\n\n\ndef is_not_prime(n):\n")
    assert "\t" not in by_id["MBPP/5"]["canonical_solution"]
    assert by_id["MBPP/5"]["canonical_solution"].startswith("    A = [0] * (n + 1)\n")
    # The tested function is count_even, not the helper defined before it; the helper follows.
    assert by_id["MBPP/901"]["entry_point"] == "count_even"
    assert "def is_even(x):" in by_id["MBPP/901"]["canonical_solution"]
    assert by_id["MBPP/901"]["test"].startswith("import re\n")  # test_setup_code, module level
    assert by_id["MBPP/902"]["prompt"].count('r"""') == 1  # backslash in the text: raw docstring


def test_mbpp_rows_that_cannot_become_tasks_are_counted_by_reason():
    tasks, skipped = convert_rows(fixture_rows("mbpp_full_rows.json"), mbpp_row_to_task)
    assert [t["task_id"] for t in tasks] == [
        "MBPP/2",
        "MBPP/3",
        "MBPP/5",
        "MBPP/11",
        "MBPP/901",
        "MBPP/902",
    ]
    assert skipped == {
        "reference code does not parse": 1,
        "no top-level function called by the tests": 1,
    }


def test_mbpp_check_passes_the_canonical_solution_and_fails_wrong_ones():
    full, _ = convert_rows(fixture_rows("mbpp_full_rows.json"), mbpp_row_to_task)
    sanitized, skipped = convert_rows(fixture_rows("mbpp_sanitized_rows.json"), mbpp_row_to_task)
    assert not skipped
    tasks = full + sanitized
    canonical = [(task, task["canonical_solution"]) for task in tasks]
    returns_none = [(task, "    return None\n") for task in tasks]
    # The right value wrapped in a list: survives set(), float tolerance and bool comparisons.
    wrapped = [
        (task, re.sub(r"return (.*)", r"return [\1]", task["canonical_solution"], count=1))
        for task in tasks
    ]
    assert run_function_tasks(canonical + returns_none + wrapped) == (
        [True] * len(tasks) + [False] * len(tasks) + [False] * len(tasks)
    )


def test_mbpp_sanitized_keeps_test_imports_at_module_level_of_the_test():
    task = mbpp_row_to_task(fixture_rows("mbpp_sanitized_rows.json")[1])
    assert task["task_id"] == "MBPP/82"
    assert task["test"].startswith(
        "import math\n\n\ndef check(candidate):\n    volume_sphere = candidate\n"
    )
    assert task["prompt"].startswith("import math\n\n\ndef volume_sphere(r):\n")


# ---------------------------------------------------------------------------------------------
# deepmind/code_contests


def test_code_contests_cpp_task_merges_and_dedupes_tests_with_exact_fields():
    rows = fixture_rows("code_contests_rows.json")
    task = code_contests_row_to_task(rows[0], 0, ("cpp",))
    assert task == {
        "task_id": "4_A. Watermelon",
        "prompt": rows[0]["description"],
        "language": "cpp",
        "tests": [
            {"input": "8\n", "output": "YES\n"},
            {"input": "5\n", "output": "NO\n"},
            {"input": "4\n", "output": "YES\n"},
            {"input": "2\n", "output": "NO\n"},
            {"input": "100\n", "output": "YES\n"},
        ],
        "canonical_solution": rows[0]["solutions"]["solution"][2],
        "source": "code_contests",
        "time_limit": 1.5,
    }


def test_code_contests_language_filter_never_picks_python2():
    rows = fixture_rows("code_contests_rows.json")
    python = code_contests_row_to_task(rows[0], 0, ("python",))
    assert python["language"] == "python"
    assert python["canonical_solution"] == rows[0]["solutions"]["solution"][1]
    assert code_contests_row_to_task(rows[0], 0, ("python", "cpp"))["language"] == "python"
    tasks, skipped = convert_rows(
        rows, lambda row, i: code_contests_row_to_task(row, i, ("python",))
    )
    assert len(tasks) == 1
    assert skipped == {"no python solution": 1, "no tests": 1}


def test_code_contests_canonical_solutions_pass_their_merged_tests(tmp_path):
    rows = fixture_rows("code_contests_rows.json")
    python = code_contests_row_to_task(rows[0], 0, ("python",))
    for test in python["tests"]:
        done = subprocess.run(
            [sys.executable, "-c", python["canonical_solution"]],
            input=test["input"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.stdout == test["output"]
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    cpp = code_contests_row_to_task(rows[0], 0, ("cpp",))
    (tmp_path / "main.cpp").write_text(cpp["canonical_solution"])
    subprocess.run(
        ["g++", "-O2", "-std=c++17", "-o", str(tmp_path / "main"), str(tmp_path / "main.cpp")],
        check=True,
        timeout=120,
    )
    outputs = [
        subprocess.run(
            [str(tmp_path / "main")], input=t["input"], capture_output=True, text=True, timeout=10
        ).stdout
        for t in cpp["tests"]
    ]
    assert outputs == [t["output"] for t in cpp["tests"]]


# ---------------------------------------------------------------------------------------------
# agentica-org/DeepCoder-Preview-Dataset


def deepcoder_tasks(subset: str):
    rows = fixture_rows("deepcoder_rows.json")[subset]
    prefix = f"deepcoder/{subset}/train"
    return convert_rows(rows, lambda row, i: deepcoder_row_to_task(row, i, prefix))


def test_deepcoder_stdin_tests_become_stdio_tasks_of_each_shape():
    lcb, _ = deepcoder_tasks("lcbv5")
    prime, _ = deepcoder_tasks("primeintellect")
    taco, _ = deepcoder_tasks("taco")
    assert lcb[0] == {
        "task_id": "deepcoder/lcbv5/train/0",
        "prompt": fixture_rows("deepcoder_rows.json")["lcbv5"][0]["problem"],
        "language": "cpp",
        "tests": [{"input": "3\n1 2 3\n", "output": "6\n"}, {"input": "1\n-5\n", "output": "-5\n"}],
    }
    assert prime[0]["tests"] == [
        {"input": "2 3\n", "output": "6\n"},
        {"input": "-1 4\n", "output": "-4\n"},
    ]
    # taco stores one output as a list of lines.
    assert taco[0]["tests"] == [
        {"input": "2\n", "output": "4\n"},
        {"input": "3\n", "output": "9\n"},
    ]
    assert (
        deepcoder_row_to_task(
            fixture_rows("deepcoder_rows.json")["lcbv5"][0], 0, language="python"
        )["language"]
        == "python"
    )


def test_deepcoder_functional_tests_become_function_tasks_not_stdin():
    lcb, _ = deepcoder_tasks("lcbv5")
    prime, _ = deepcoder_tasks("primeintellect")
    taco, _ = deepcoder_tasks("taco")
    assert (lcb[1]["entry_point"], prime[1]["entry_point"], taco[1]["entry_point"]) == (
        "Solution",
        "evens",
        "count_vowels",
    )
    for task in (lcb[1], prime[1], taco[1]):
        assert "tests" not in task and task["language"] == "python"
    assert lcb[1]["prompt"].endswith(
        "class Solution:\n    def maxSum(self, nums: List[int], k: int) -> int:\n"
    )
    assert "The solution is a function named evens." in prime[1]["prompt"]


def test_deepcoder_functional_checks_pass_right_solutions_and_fail_wrong_ones():
    lcb, _ = deepcoder_tasks("lcbv5")
    prime, _ = deepcoder_tasks("primeintellect")
    taco, _ = deepcoder_tasks("taco")
    solution_class, evens, vowels = lcb[1], prime[1], taco[1]
    right = [
        (solution_class, "        return sum(sorted(nums)[-k:])\n"),
        # A tuple where the data set has a JSON list is accepted, as its own checker does.
        (evens, "def evens(n):\n    return [2 * i for i in range(n)], n\n"),
        (vowels, "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n"),
    ]
    wrong = [
        (solution_class, "        return max(nums)\n"),
        (evens, "def evens(n):\n    return [2 * i for i in range(n)], n + 1\n"),
        (vowels, "def count_vowels(s):\n    return len(s)\n"),
        (vowels, "def count_other(s):\n    return 0\n"),  # wrong name: check(count_vowels) fails
    ]
    assert run_function_tasks(right + wrong) == [True] * 3 + [False] * 4


def test_deepcoder_rows_without_usable_tests_are_counted():
    _, skipped = deepcoder_tasks("taco")
    assert skipped == {"no tests": 1, "tests are not valid JSON": 1}
    mixed = {
        "problem": "p",
        "tests": json.dumps(
            [
                {"input": "1\n", "output": "1\n", "testtype": "stdin"},
                {"input": "1", "output": "1", "testtype": "functional"},
            ]
        ),
        "metadata": json.dumps({"func_name": "f"}),
    }
    nameless = {
        "problem": "p",
        "tests": json.dumps([{"input": "1", "output": "1", "testtype": "functional"}]),
    }
    _, skipped = convert_rows([mixed, nameless], deepcoder_row_to_task)
    assert skipped == {
        "mixes stdin and functional tests": 1,
        "functional tests without a function name": 1,
    }


# ---------------------------------------------------------------------------------------------
# Loading (the network is replaced by fixture rows or a failing loader)


def test_load_hub_tasks_converts_the_rows_the_loader_returns(monkeypatch):
    calls = []

    def fake_rows(path, config, split, max_rows=0):
        calls.append((path, config, split, max_rows))
        return fixture_rows("code_contests_rows.json")

    monkeypatch.setattr(hub_data, "load_hub_rows", fake_rows)
    tasks, skipped = load_hub_tasks("code_contests", "test", ("cpp",), max_rows=5)
    assert calls == [("deepmind/code_contests", None, "test", 5)]
    assert [t["task_id"] for t in tasks] == ["4_A. Watermelon"]
    assert skipped == {"no cpp solution": 1, "no tests": 1}


def test_load_hub_tasks_rejects_unknown_split_source_and_subset():
    with pytest.raises(
        UserError, match="code_contests .* has no split 'validation'; it has train, valid, test"
    ):
        load_hub_tasks("code_contests", "validation")
    with pytest.raises(UserError, match="unknown hub source 'apps'"):
        load_hub_tasks("apps", "test")
    with pytest.raises(UserError, match="unknown DeepCoder subset 'lcbv9'"):
        load_hub_tasks("deepcoder", "train", deepcoder_subset="lcbv9")
    with pytest.raises(UserError, match=r"deepcoder \(taco\) has no split 'test'"):
        load_hub_tasks("deepcoder", "test", deepcoder_subset="taco")


def test_hub_load_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'google-research-datasets/mbpp' on the Hub\nsecond line"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        load_hub_rows("google-research-datasets/mbpp", "full", "test")
    assert str(err.value) == (
        "cannot load google-research-datasets/mbpp (full) split 'test' from the hub:"
        " Couldn't reach 'google-research-datasets/mbpp' on the Hub"
    )
