"""Each reward by hand on fixed verdicts; infra errors masked, never scored."""

import pytest

from coderl.rewards import RewardArgs, Scored, compute_rewards, quality_checks
from sandbox import Result

PY_TASK = {"task_id": "t", "prompt": "def f(x: int) -> int:\n", "entry_point": "f", "test": ""}
CPP_TASK = {
    "task_id": "c",
    "prompt": "sum",
    "language": "cpp",
    "tests": [{"input": "", "output": ""}] * 4,
}
GOOD_BODY = '    """Add one."""\n    return x + 1\n'
GOOD_CODE = "def f(x: int) -> int:\n" + GOOD_BODY


def item(status, task=PY_TASK, code="    return x\n", tokens=50, **kw):
    return Scored(
        task=task,
        code=code,
        num_tokens=tokens,
        result=Result(status=status, passed=status == "passed", **kw),
    )


def rewards(name, items, **kw):
    return compute_rewards(items, RewardArgs(reward=name, **kw))


def test_unit_test_with_length_penalty():
    r, mask = rewards(
        "unit_test", [item("passed", tokens=50), item("failed", tokens=200)], length_alpha=0.01
    )
    assert r == pytest.approx([1.0 - 0.005, 0.0 - 0.02])
    assert mask == [True, True]


def test_partial_follows_the_tinylora_seed_table():
    items = [
        item("compile_error", CPP_TASK, compiled=False, tests_passed=0, tests_total=4),
        item("failed", CPP_TASK, compiled=True, tests_passed=0, tests_total=4),
        item("failed", CPP_TASK, compiled=True, tests_passed=3, tests_total=4),
        item("passed", CPP_TASK, compiled=True, tests_passed=4, tests_total=4),
        item("timeout", CPP_TASK, compiled=True, tests_passed=1, tests_total=4),
    ]
    r, _ = rewards("partial", items)
    assert r == pytest.approx([0.0, 0.5, 0.875, 1.0, 0.625])


def test_shaped_levels_and_bonuses():
    untyped = {**PY_TASK, "prompt": "def f(x):\n"}
    r, _ = rewards(
        "shaped",
        [
            item("passed", code=GOOD_BODY),  # 1 + docstring + type hints + concise + line length
            item("failed", code=GOOD_BODY),
            item("syntax_error", code="    return (\n"),  # no bonuses for code that does not parse
            item("timeout", task=untyped, code="    return x\n"),
        ],
    )
    assert r[0] == pytest.approx(1.2)
    assert r[1] == pytest.approx(0.4)
    assert r[2] == pytest.approx(-0.5)
    # prompt + body parse: no docstring, no hints; short lines and concise: 0 + 0.05 * 2
    assert r[3] == pytest.approx(0.1)


def test_weighted_sum():
    args = dict(w_compile=0.2, w_correct=0.7, w_quality=0.1)
    r, _ = rewards(
        "weighted",
        [
            item("passed", code=GOOD_BODY),
            item(
                "failed",
                CPP_TASK,
                code="int main(){}\n",
                compiled=True,
                tests_passed=1,
                tests_total=4,
            ),
            item(
                "compile_error",
                CPP_TASK,
                code="int main(\n",
                compiled=False,
                tests_passed=0,
                tests_total=4,
            ),
        ],
        **args,
    )
    assert r[0] == pytest.approx(0.2 + 0.7 + 0.1)
    # C++: quality = (line_length + concise + no docstring + no type hints) / 4 = 0.5
    assert r[1] == pytest.approx(0.2 + 0.7 * 0.25 + 0.1 * 0.5)
    assert r[2] == pytest.approx(0.0)


def test_infra_error_is_masked_not_scored():
    r, mask = rewards("shaped", [item("infra_error"), item("passed", code=GOOD_BODY)])
    assert mask == [False, True]
    assert r[0] == 0.0


def test_a_reward_that_returns_the_wrong_count_is_an_error(monkeypatch):
    from coderl import rewards as mod

    monkeypatch.setitem(mod.REWARDS, "unit_test", lambda items, args: [1.0])
    with pytest.raises(RuntimeError, match="returned 1 values for 2 samples"):
        rewards("unit_test", [item("passed"), item("failed")])


def test_quality_checks():
    checks = quality_checks(GOOD_CODE, RewardArgs())
    assert checks == {"line_length": True, "concise": True, "docstring": True, "type_hints": True}
    long = "x = 1\n" * 31 + "y = '" + "a" * 120 + "'\n"
    checks = quality_checks(long, RewardArgs())
    assert checks == {
        "line_length": False,
        "concise": False,
        "docstring": False,
        "type_hints": False,
    }
