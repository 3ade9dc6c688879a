"""Toy task families: sizes, determinism, disjoint splits, and tests that really test.

Python tasks are executed in a separate Python process (not the project's sandbox), C++ tasks
are compiled with ``g++ -O2 -std=c++17`` and run on their stdin tests.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections import Counter

import pytest

from coderl.errors import UserError
from coderl.tasks import load_tasks, write_jsonl
from coderl.toy_tasks import (
    generate_toy_cpp,
    generate_toy_python,
    toy_cpp_splits,
    toy_python_splits,
)
from tests.helpers import run_function_tasks


@pytest.fixture(scope="module")
def python_tasks():
    return generate_toy_python()


@pytest.fixture(scope="module")
def cpp_tasks():
    return generate_toy_cpp()


def structure(task: dict) -> str:
    """The task's text with every constant replaced: equal for tasks that differ only in k."""
    return re.sub(r"-?\d+", "k", task["prompt"])


def steps(task: dict) -> int:
    if task["language"] == "cpp":
        return len(task["prompt"].splitlines()) - 3  # 2 header lines, 1 final line
    return task["canonical_solution"].count("\n") - 1  # minus the return line


def test_default_sizes_and_family_mix(python_tasks, cpp_tasks):
    train, test = python_tasks
    assert (len(train), len(test)) == (500, 300)
    assert Counter(t["entry_point"].split("_")[0] for t in train) == {"num": 250, "list": 250}
    assert Counter(t["entry_point"].split("_")[0] for t in test) == {"num": 150, "list": 150}
    assert [t["task_id"] for t in train[:2]] == ["toy_python/train/0", "toy_python/train/1"]
    assert (len(cpp_tasks[0]), len(cpp_tasks[1])) == (300, 100)
    for split in (*python_tasks, *cpp_tasks):
        counts = Counter(steps(t) for t in split)
        assert set(counts) == {1, 2, 3}
        assert counts[2] + counts[3] > 0.7 * len(split)  # mostly compositions


def test_generation_is_deterministic_and_seeded(python_tasks, cpp_tasks):
    # The default sizes are compared byte for byte by the prepare_data rerun test.
    assert generate_toy_python(60, 40) == generate_toy_python(60, 40)
    assert generate_toy_cpp(30, 20) == generate_toy_cpp(30, 20)
    other_train, _ = generate_toy_python(60, 40, seed=7)
    assert [t["prompt"] for t in other_train] != [
        t["prompt"] for t in generate_toy_python(60, 40)[0]
    ]


@pytest.mark.parametrize("family", ["python", "cpp"])
def test_splits_share_no_prompt_solution_or_multistep_structure(python_tasks, cpp_tasks, family):
    train, test = python_tasks if family == "python" else cpp_tasks
    for field in ("prompt", "canonical_solution"):
        assert len({t[field] for t in train + test}) == len(train) + len(test)
    assert not {t["task_id"] for t in train} & {t["task_id"] for t in test}
    # Every test composition (2+ steps) is a sequence of step kinds never seen in training.
    train_structures = {structure(t) for t in train}
    held_out = [t for t in test if steps(t) > 1]
    assert len(held_out) > 0.7 * len(test)
    assert not [t["task_id"] for t in held_out if structure(t) in train_structures]

    # Single steps differ from training by their constant only: the step kinds all occur in train.
    def sentences(task):
        return {line for line in structure(task).splitlines() if not line.startswith("def ")}

    train_sentences = set().union(*(sentences(t) for t in train))
    assert all(sentences(t) <= train_sentences for t in test)


def test_python_tasks_are_valid_regular_and_short(python_tasks, tmp_path):
    train, test = python_tasks
    write_jsonl(tmp_path / "toy.jsonl", train + test)
    assert len(load_tasks(tmp_path / "toy.jsonl")) == 800  # schema-valid, unique ids
    shape = re.compile(
        r'def (num|list)_\w+\((x|xs)\):\n    """Start from the .+\n(    .+\n)+    """\n'
    )
    for task in train + test:
        assert shape.fullmatch(task["prompt"]), task["prompt"]
        assert task["test"].startswith("def check(candidate):\n")
        assert task["test"].count("assert candidate(") == 5
        assert len(task["canonical_solution"]) <= 160
        ast.parse(task["prompt"] + task["canonical_solution"])


def test_python_canonical_solutions_pass_and_perturbed_ones_fail(python_tasks):
    tasks = python_tasks[0] + python_tasks[1]

    def without_first_step(task):
        return "".join(task["canonical_solution"].splitlines(keepends=True)[1:])

    def constant_shifted(task):
        return re.sub(
            r"\d+", lambda m: str(int(m.group()) + 1), task["canonical_solution"], count=1
        )

    with_constant = [t for t in tasks if re.search(r"\d", t["canonical_solution"])]
    results = run_function_tasks(
        [(t, t["canonical_solution"]) for t in tasks]
        + [(t, without_first_step(t)) for t in tasks]
        + [(t, constant_shifted(t)) for t in with_constant]
    )
    canonical, dropped, shifted = (
        results[: len(tasks)],
        results[len(tasks) : 2 * len(tasks)],
        results[2 * len(tasks) :],
    )
    assert sum(canonical) == len(tasks)
    assert sum(dropped) == 0  # inputs are chosen so that every step changes some output
    assert len(with_constant) > 0.6 * len(tasks)
    assert sum(shifted) == 0  # and so that every constant matters to within one


def test_max_ops_knob_and_impossible_requests():
    train, test = generate_toy_python(40, 20, max_ops=1)
    assert {steps(t) for t in train + test} == {1}
    train, test = generate_toy_cpp(30, 10, max_ops=2)
    assert {steps(t) for t in train + test} == {1, 2}
    # About 60 single-step num tasks exist in all.
    with pytest.raises(
        UserError, match="cannot make 50 train \\+ 30 test distinct tasks with max_ops=1"
    ):
        generate_toy_python(100, 60, max_ops=1)
    with pytest.raises(UserError, match="max_ops >= 1"):
        generate_toy_cpp(10, 10, max_ops=0)


@pytest.mark.parametrize("make", [toy_python_splits, toy_cpp_splits])
def test_rl_pool_structures_are_disjoint_from_train_and_test(make):
    splits = make({"train": 200, "test": 100, "rl": 300})
    assert {split: len(tasks) for split, tasks in splits.items()} == {
        "train": 200,
        "test": 100,
        "rl": 300,
    }
    # Asking for a pool leaves the held-out split exactly as it was.
    assert splits["test"] == make({"train": 50, "test": 100})["test"]
    assert splits["rl"][0]["task_id"].split("/")[1:] == ["rl", "0"]
    multi = {
        split: {structure(t) for t in tasks if steps(t) > 1} for split, tasks in splits.items()
    }
    assert len(multi["rl"]) > 150
    assert not multi["rl"] & multi["train"]
    assert not multi["rl"] & multi["test"]
    assert not multi["train"] & multi["test"]
    prompts = [t["prompt"] for tasks in splits.values() for t in tasks]
    assert len(set(prompts)) == len(prompts)
    with pytest.raises(UserError, match="unknown split"):
        make({"dev": 3})


@pytest.mark.parametrize("make", [toy_python_splits, toy_cpp_splits])
def test_validation_slice_is_held_back_from_the_rl_pool_and_changes_no_other_split(make):
    plain = make({"train": 60, "test": 30, "rl": 41}, 2, 7)
    held = make({"train": 60, "test": 30, "rl": 41, "val": 25}, 2, 7)
    for split in ("train", "test", "rl"):
        assert held[split] == plain[split], split
    val = held["val"]
    assert len(val) == 25
    assert [t["task_id"].split("/")[1:] for t in val[:2]] == [["val", "0"], ["val", "1"]]
    # Other tasks than the pool's, of structures neither train nor test uses.
    assert not {t["prompt"] for t in val} & {t["prompt"] for t in held["rl"]}
    multi_val = {structure(t) for t in val if steps(t) > 1}
    assert multi_val
    for split in ("train", "test"):
        assert not multi_val & {structure(t) for t in held[split] if steps(t) > 1}, split
    assert not any("flaw" in t for t in make({"rl": 4, "val": 4}, 2, 7, flawed_share=1.0)["val"])
    with pytest.raises(UserError, match="held back from the RL pool"):
        make({"train": 10, "val": 3})


def test_cpp_task_shape(cpp_tasks):
    for task in cpp_tasks[0] + cpp_tasks[1]:
        assert task["language"] == "cpp"
        assert task["prompt"].startswith("Read an integer n and then n integers.\n")
        assert len(task["tests"]) == 5
        for test in task["tests"]:
            count, values = test["input"].splitlines()
            assert int(count) == len(values.split()) >= 1
            assert test["output"].endswith("\n")


def compile_cpp(sources: list[str], folder) -> list[str]:
    """Compile each source with the flags the issue names, all at once; the binaries' paths."""
    binaries, jobs = [], []
    for index, source in enumerate(sources):
        (folder / f"{index}.cpp").write_text(source)
        binaries.append(str(folder / str(index)))
        command = ["g++", "-O2", "-std=c++17", "-o", binaries[-1], str(folder / f"{index}.cpp")]
        jobs.append(subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
    for job in jobs:
        _, errors = job.communicate(timeout=180)
        assert job.returncode == 0, errors
    return binaries


def run_cpp(binary: str, tests: list[dict]) -> list[str]:
    return [
        subprocess.run(
            [binary], input=t["input"], capture_output=True, text=True, timeout=10
        ).stdout
        for t in tests
    ]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_cpp_canonical_solutions_compile_and_pass_a_sample(cpp_tasks, tmp_path):
    tasks = cpp_tasks[0] + cpp_tasks[1]
    # C++ and Python disagree on / and % of negatives: make sure the sample exercises both.
    with_division = [t for t in tasks if re.search(r"x = x [/%]", t["canonical_solution"])][:4]
    printing_each = [t for t in tasks if "cout << x" in t["canonical_solution"]][:2]
    sample = with_division + printing_each + tasks[:: len(tasks) // 4][:4]
    assert len(sample) == 10
    assert any(t["tests"][0]["input"].count("-") for t in with_division)
    binaries = compile_cpp([t["canonical_solution"] for t in sample], tmp_path)
    for binary, task in zip(binaries, sample):
        assert run_cpp(binary, task["tests"]) == [t["output"] for t in task["tests"]], task[
            "task_id"
        ]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_cpp_solution_missing_a_step_fails_its_tests(cpp_tasks, tmp_path):
    task = next(t for t in cpp_tasks[1] if steps(t) == 3)
    lines = task["canonical_solution"].splitlines(keepends=True)
    first_step = next(i for i, line in enumerate(lines) if line.startswith("        x = "))
    (binary,) = compile_cpp(["".join(lines[:first_step] + lines[first_step + 1 :])], tmp_path)
    assert run_cpp(binary, task["tests"]) != [t["output"] for t in task["tests"]]


def test_flawed_demonstrations_drop_the_last_step_and_fail_their_own_tests():
    counts = {"train": 200, "test": 60, "rl": 80}
    clean = toy_python_splits(counts, seed=7)
    flawed = toy_python_splits(counts, seed=7, flawed_share=0.5)
    # Only train rows change; the RL pool and the held-out tasks are the same files.
    assert flawed["test"] == clean["test"] and flawed["rl"] == clean["rl"]
    changed = [(a, b) for a, b in zip(flawed["train"], clean["train"]) if a != b]
    marked = [task for task in flawed["train"] if task.get("flaw") == "drops the last step"]
    assert len(changed) == len(marked)
    assert 0.4 * 200 < len(marked) < 0.6 * 200  # chosen by hash: about the share asked for
    for bad, good in changed:
        assert {k: v for k, v in bad.items() if k not in ("flaw", "canonical_solution")} == {
            k: v for k, v in good.items() if k != "canonical_solution"
        }
        lines = good["canonical_solution"].splitlines(keepends=True)
        assert bad["canonical_solution"] == "".join(lines[:-2] + lines[-1:])
    # The sandbox-independent runner fails exactly the flawed demonstrations.
    results = run_function_tasks([(task, task["canonical_solution"]) for task in flawed["train"]])
    assert [not ok for ok in results] == ["flaw" in task for task in flawed["train"]]
    # The same rows for a seed; another share keeps the choice nested (a hash threshold).
    assert toy_python_splits(counts, seed=7, flawed_share=0.5) == flawed
    fewer = toy_python_splits(counts, seed=7, flawed_share=0.2)["train"]
    fewer_ids = {task["task_id"] for task in fewer if "flaw" in task}
    assert 0 < len(fewer_ids) < len(marked)
    assert fewer_ids <= {task["task_id"] for task in marked}
    assert not any("flaw" in task for task in toy_python_splits(counts, seed=7)["train"])
    with pytest.raises(UserError, match=r"flawed demonstrations must be in \[0, 1\], got 1.5"):
        toy_python_splits(counts, flawed_share=1.5)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_flawed_cpp_demonstration_compiles_and_fails(tmp_path):
    splits = toy_cpp_splits({"train": 40, "test": 10}, seed=3, flawed_share=1.0)
    assert all(task["flaw"] == "drops the last step" for task in splits["train"])
    assert not any("flaw" in task for task in splits["test"])
    task = splits["train"][0]
    (binary,) = compile_cpp([task["canonical_solution"]], tmp_path)
    assert run_cpp(binary, task["tests"]) != [t["output"] for t in task["tests"]]
