"""pass@k, summaries and tables, checked against hand-computed numbers."""

from math import comb

import pytest

from coderl.evaluation import (
    TABLE_HEADER,
    pass_at_k,
    per_task_diff,
    summarize,
    table_header,
    table_row,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (10, 3, 1, 0.3),  # pass@1 is the plain pass rate
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (10, 8, 3, 1.0),  # fewer than k failures: some k-subset always passes
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_formula_on_a_grid():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def rows(spec):
    """spec: {task_id: [passed bools]} -> result rows."""
    out = []
    for tid, verdicts in spec.items():
        for i, ok in enumerate(verdicts):
            out.append(
                {
                    "task_id": tid,
                    "completion_id": i,
                    "passed": ok,
                    "status": "passed" if ok else "failed",
                    "num_tokens": 10 + i,
                }
            )
    return out


def test_summarize_counts_and_pass_at_k():
    results = rows({"a": [True, False, False, False], "b": [False] * 4, "c": [True] * 4})
    s = summarize(results, ks=(1, 2, 10))
    assert s["num_tasks"] == 3 and s["num_samples"] == 12
    # per task pass@1: 1/4, 0, 1 -> mean 5/12
    assert s["pass@k"]["pass@1"] == pytest.approx(5 / 12)
    # pass@2: a: 1 - C(3,2)/C(4,2) = 1/2; b: 0; c: 1 -> 1/2
    assert s["pass@k"]["pass@2"] == pytest.approx(0.5)
    assert "pass@10" not in s["pass@k"]  # 4 samples per task cannot estimate pass@10
    assert s["status_counts"] == {"failed": 7, "passed": 5}
    assert s["passed_tasks"] == 2  # first samples of a and c
    assert s["avg_num_tokens"] == pytest.approx(11.5)


def test_table_of_pass_at_k_counts_tasks_any_sample_solved():
    results = rows({"a": [False, True], "b": [False, False], "c": [True, True]})
    s = summarize(results, ks=(1, 2))
    assert s["passed_tasks"] == 1 and s["solved_tasks"] == 2
    assert table_header(2).splitlines()[0] == (
        "| Model / Checkpoint | Method | pass@2 | #solved / #tasks | Avg. length |"
    )
    assert table_header(1) == TABLE_HEADER
    assert table_row("m", "SFT", s, k=2) == "| `m` | SFT | 0.667 | 2 / 3 | 10.50 |"
    assert table_row("m", "SFT", s) == "| `m` | SFT | 0.500 | 1 / 3 | 10.50 |"


def test_summarize_greedy_pass_at_1_equals_fraction_of_tasks():
    results = rows({f"t{i}": [i % 3 == 0] for i in range(33)})
    s = summarize(results)
    assert s["passed_tasks"] == 11
    assert s["pass@k"]["pass@1"] == pytest.approx(11 / 33)
    assert table_row("m", "Base", s) == "| `m` | Base | 0.333 | 11 / 33 | 10.00 |"


def test_summarize_stdin_rows_report_test_fraction_and_compile_rate():
    results = [
        {
            "task_id": "a",
            "completion_id": 0,
            "passed": False,
            "status": "failed",
            "tests_passed": 1,
            "tests_total": 4,
            "compiled": True,
        },
        {
            "task_id": "b",
            "completion_id": 0,
            "passed": False,
            "status": "compile_error",
            "tests_passed": 0,
            "tests_total": 2,
            "compiled": False,
        },
    ]
    s = summarize(results)
    assert s["avg_test_fraction"] == pytest.approx(0.125)
    assert s["compile_rate"] == pytest.approx(0.5)


def test_per_task_diff():
    a = rows({"x": [True], "y": [True], "z": [False], "w": [False]})
    b = rows({"x": [True], "y": [False], "z": [True], "w": [False]})
    d = per_task_diff(a, b)
    assert d == {"only_a": ["y"], "only_b": ["z"], "both": ["x"], "neither": ["w"]}


def test_wilson_interval_shows_how_wide_33_tasks_are():
    lo, hi = wilson_interval(16, 33)
    assert lo < 0.33 and hi > 0.64  # one task is 3 points; the interval spans ~30 points
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
