"""Toy task families, generated locally and deterministically, for the tiny preset and the tests.

Each task is a short straight-line program: a composition of 1 to ``max_ops`` primitive steps
(add k, multiply by k, take the maximum with k, keep the items greater than k, reverse, ...), each
described by one templated English sentence and implemented by one regular line of code. The
model must learn the sentence -> line mapping and copy the constants; held-out tasks combine the
same vocabulary in ways never seen in training, so it has to generalise instead of recalling.

Three families:

* ``num``  (Python, HumanEval shape): ``def num_add_mul(x):`` + docstring, body ``x = x + 3`` ...
* ``list`` (Python, HumanEval shape): ``def list_gt_add_sum(xs):``, body
  ``xs = [v for v in xs if v > 2]`` ... then ``return xs`` / ``sum(xs)`` / ``len(xs)``;
* ``cpp``  (stdin/stdout): read n integers, apply the steps to each, print an aggregate (sum,
  largest, smallest, number of positive results, or every result); the canonical solution is a
  fixed 15-line C++ program with the step lines in the loop.

How train and test are kept apart: a task's *structure* is its family, its step names in order
and its final step. For tasks of two or more steps, a fixed share of the structures (chosen by a
hash of the structure and the seed) exists only in the test split, so every such test task is a
composition the model never saw. Single-step tasks are split by their constant instead (``add 7``
may be a test task while ``add 3`` is a train task). No prompt or solution is shared.

Every task's test inputs are chosen so that removing any one step, or moving any constant by one,
changes at least one expected output, and the outputs are not all equal: a solution that skips a
step, miscopies a constant by one, or returns a constant, fails. A composition where some step can
never matter (``abs`` after ``square``) is dropped.

Flawed demonstrations (``flawed_share``, off by default): scraped SFT data holds solutions that are
wrong in one consistent way. When asked, that share of the *train* split's rows (chosen by a hash
of the task, so the same rows for a seed) gets a canonical solution that forgets the task's last
step; the prompt and the tests stay those of the whole task, so running the canonical solutions
fails exactly these demonstrations, and the row says so in ``"flaw"``. Imitation learns the
omission along with the skill; a reward from the tests can unlearn it. The RL pool and the test
split never have flawed rows.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coderl.errors import UserError

# Share of multi-step structures (and of single-step constants) that only the test split uses.
HOLDOUT_SHARE = 0.3
# When an RL pool is asked for: share of the remaining structures that only the pool uses.
RL_SHARE = 0.5
# Outputs past this size make long, unreadable test lines; such input draws are redrawn.
MAX_ABS_VALUE = 10**6
# Test-input draws per spec: a spec that can be tested almost always is within 5 draws.
INPUT_DRAWS = 8
# The ``flaw`` field of a flawed demonstration (see the module docstring).
FLAW = "drops the last step"


@dataclass(frozen=True)
class Step:
    """One primitive operation: its sentence, its line of code, and its meaning."""

    name: str
    phrase: str  # English, with {k} for the constant
    code: str  # one line, with {k}
    apply: Callable[[Any, int | None], Any]
    constants: tuple[int, ...] = ()


@dataclass(frozen=True)
class Final:
    """The last line: what is returned or printed."""

    name: str
    phrase: str
    code: str
    apply: Callable[[Any], Any]


@dataclass(frozen=True)
class Spec:
    """A task before rendering: family, the (step name, constant) sequence, and the final step."""

    family: str
    steps: tuple[tuple[str, int | None], ...]
    final: str

    def structure(self) -> tuple:
        return (self.family, *(name for name, _ in self.steps), self.final)

    def without_step(self, index: int) -> Spec:
        return Spec(self.family, self.steps[:index] + self.steps[index + 1 :], self.final)

    def variants(self) -> list[Spec]:
        """Near misses the tests must reject: each step dropped, each constant off by one."""
        near = [self.without_step(i) for i in range(len(self.steps))]
        for i, (name, k) in enumerate(self.steps):
            if k is not None:
                for other in (k - 1, k + 1):
                    if other != 0:  # x // 0 is an error, not a near miss
                        steps = (*self.steps[:i], (name, other), *self.steps[i + 1 :])
                        near.append(Spec(self.family, steps, self.final))
        return near


def _floor_div(x: int, k: int) -> int:
    return x // k


def _trunc_div(x: int, k: int) -> int:
    # C++ integer division rounds toward zero, Python's floors.
    quotient = abs(x) // abs(k)
    return quotient if (x >= 0) == (k > 0) else -quotient


def _trunc_mod(x: int, k: int) -> int:
    return x - k * _trunc_div(x, k)


ADDENDS = tuple(range(1, 10))
FACTORS = tuple(range(2, 10))
DIVISORS = tuple(range(2, 6))
BOUNDS = tuple(range(0, 10))
THRESHOLDS = tuple(range(-3, 6))


def _scalar_steps(language: str) -> dict[str, Step]:
    """Steps on one integer ``x``; the C++ spelling and semantics differ for div, mod and abs."""
    cpp = language == "cpp"
    end = ";" if cpp else ""
    suffix = "LL" if cpp else ""  # std::max(long long, int) would not compile
    steps = [
        Step("add", "Add {k}.", "x = x + {k}" + end, lambda x, k: x + k, ADDENDS),
        Step("sub", "Subtract {k}.", "x = x - {k}" + end, lambda x, k: x - k, ADDENDS),
        Step("mul", "Multiply by {k}.", "x = x * {k}" + end, lambda x, k: x * k, FACTORS),
        Step(
            "div",
            "Divide by {k}, rounding toward zero." if cpp else "Divide by {k}, rounding down.",
            "x = x / {k};" if cpp else "x = x // {k}",
            _trunc_div if cpp else _floor_div,
            DIVISORS,
        ),
        Step(
            "mod",
            "Take the remainder after dividing by {k}.",
            "x = x % {k}" + end,
            _trunc_mod if cpp else (lambda x, k: x % k),
            FACTORS,
        ),
        Step(
            "max",
            "Take the maximum of it and {k}.",
            "x = max(x, {k}" + suffix + ")" + end,
            lambda x, k: max(x, k),
            BOUNDS,
        ),
        Step(
            "min",
            "Take the minimum of it and {k}.",
            "x = min(x, {k}" + suffix + ")" + end,
            lambda x, k: min(x, k),
            BOUNDS,
        ),
        Step(
            "abs",
            "Take the absolute value.",
            "x = max(x, -x);" if cpp else "x = abs(x)",
            lambda x, k: abs(x),
        ),
        Step("neg", "Negate it.", "x = -x" + end, lambda x, k: -x),
        Step("sq", "Square it.", "x = x * x" + end, lambda x, k: x * x),
    ]
    return {step.name: step for step in steps}


def _list_steps() -> dict[str, Step]:
    steps = [
        Step(
            "add",
            "Add {k} to every item.",
            "xs = [v + {k} for v in xs]",
            lambda xs, k: [v + k for v in xs],
            ADDENDS,
        ),
        Step(
            "sub",
            "Subtract {k} from every item.",
            "xs = [v - {k} for v in xs]",
            lambda xs, k: [v - k for v in xs],
            ADDENDS,
        ),
        Step(
            "mul",
            "Multiply every item by {k}.",
            "xs = [v * {k} for v in xs]",
            lambda xs, k: [v * k for v in xs],
            FACTORS,
        ),
        Step("neg", "Negate every item.", "xs = [-v for v in xs]", lambda xs, k: [-v for v in xs]),
        Step(
            "abs",
            "Replace every item by its absolute value.",
            "xs = [abs(v) for v in xs]",
            lambda xs, k: [abs(v) for v in xs],
        ),
        Step(
            "gt",
            "Keep only the items greater than {k}.",
            "xs = [v for v in xs if v > {k}]",
            lambda xs, k: [v for v in xs if v > k],
            THRESHOLDS,
        ),
        Step(
            "lt",
            "Keep only the items less than {k}.",
            "xs = [v for v in xs if v < {k}]",
            lambda xs, k: [v for v in xs if v < k],
            THRESHOLDS,
        ),
        Step(
            "even",
            "Keep only the even items.",
            "xs = [v for v in xs if v % 2 == 0]",
            lambda xs, k: [v for v in xs if v % 2 == 0],
        ),
        Step(
            "odd",
            "Keep only the odd items.",
            "xs = [v for v in xs if v % 2 == 1]",
            lambda xs, k: [v for v in xs if v % 2 == 1],
        ),
        Step("rev", "Reverse the list.", "xs = xs[::-1]", lambda xs, k: xs[::-1]),
        Step(
            "sort",
            "Sort the list in increasing order.",
            "xs = sorted(xs)",
            lambda xs, k: sorted(xs),
        ),
    ]
    return {step.name: step for step in steps}


NUM_STEPS = _scalar_steps("python")
CPP_STEPS = _scalar_steps("cpp")
LIST_STEPS = _list_steps()

NUM_FINALS = {"ret": Final("ret", "Return the result.", "return x", lambda x: x)}
LIST_FINALS = {
    final.name: final
    for final in (
        Final("list", "Return the list.", "return xs", lambda xs: xs),
        Final("sum", "Return the sum of the items.", "return sum(xs)", sum),
        Final("len", "Return the number of items.", "return len(xs)", len),
    )
}
# C++ finals: ``code`` ends the loop body; after the loop the program prints ``s``, except for
# ``each``, whose results are printed as they go.
CPP_FINALS = {
    final.name: final
    for final in (
        Final("sum", "Print the sum of the results.", "s = s + x;", sum),
        Final("max", "Print the largest result.", "if (i == 0 || x > s) s = x;", max),
        Final("min", "Print the smallest result.", "if (i == 0 || x < s) s = x;", min),
        Final(
            "pos",
            "Print how many results are positive.",
            "if (x > 0) s = s + 1;",
            lambda xs: sum(1 for v in xs if v > 0),
        ),
        Final("each", "Print each result on its own line.", "cout << x << endl;", list),
    )
}


@dataclass(frozen=True)
class Family:
    """A vocabulary of steps and finals, and how to draw one input for a test."""

    name: str
    steps: dict[str, Step]
    finals: dict[str, Final]
    sample_input: Callable[[random.Random], Any]

    def run(self, spec: Spec, value: Any) -> Any:
        """The expected output of ``spec`` on one input, in this family's semantics."""
        if self.name == "cpp":
            results = [self._run_steps(spec, x) for x in value]
            return self.finals[spec.final].apply(results)
        return self.finals[spec.final].apply(self._run_steps(spec, value))

    def _run_steps(self, spec: Spec, value: Any) -> Any:
        for name, k in spec.steps:
            value = self.steps[name].apply(value, k)
        return value

    def sample_spec(self, rng: random.Random, max_ops: int) -> Spec:
        # Longer compositions are both more numerous and harder: weight them up.
        count = rng.choices(range(1, max_ops + 1), weights=range(1, max_ops + 1))[0]
        names: list[str] = []
        while len(names) < count:
            name = rng.choice(sorted(self.steps))
            # The same step twice in a row is one step with another constant, or a no-op.
            if not names or names[-1] != name:
                names.append(name)
        steps = tuple(
            (name, rng.choice(self.steps[name].constants) if self.steps[name].constants else None)
            for name in names
        )
        return Spec(self.name, steps, rng.choice(sorted(self.finals)))


def _sample_int(rng: random.Random) -> int:
    return rng.randint(-12, 12)


def _sample_list(rng: random.Random) -> list[int]:
    return [rng.randint(-9, 9) for _ in range(rng.randint(2, 6))]


def _sample_cpp_input(rng: random.Random) -> list[int]:
    return [rng.randint(-12, 12) for _ in range(rng.randint(1, 6))]


NUM = Family("num", NUM_STEPS, NUM_FINALS, _sample_int)
LIST = Family("list", LIST_STEPS, LIST_FINALS, _sample_list)
CPP = Family("cpp", CPP_STEPS, CPP_FINALS, _sample_cpp_input)
FAMILIES = {family.name: family for family in (NUM, LIST, CPP)}
INPUTS_PER_TASK = 5


def generate_toy_python(
    n_train: int = 500, n_test: int = 300, max_ops: int = 3, seed: int = 42
) -> tuple[list[dict], list[dict]]:
    """Python function tasks, ``num`` and ``list`` alternating, as (train, test) with no overlap."""
    splits = toy_python_splits({"train": n_train, "test": n_test}, max_ops, seed)
    return splits["train"], splits["test"]


def generate_toy_cpp(
    n_train: int = 300, n_test: int = 100, max_ops: int = 3, seed: int = 42
) -> tuple[list[dict], list[dict]]:
    """C++ stdin/stdout tasks, as (train, test) with no overlap."""
    splits = toy_cpp_splits({"train": n_train, "test": n_test}, max_ops, seed)
    return splits["train"], splits["test"]


def toy_python_splits(
    counts: dict[str, int], max_ops: int = 3, seed: int = 42, flawed_share: float = 0.0
) -> dict:
    """Python tasks per split (``train``, ``test``, optionally ``rl`` and ``val``), structures disjoint.

    The ``rl`` pool is for reinforcement learning from tests: prompts whose structures neither
    the SFT demonstrations (``train``) nor the held-out tasks (``test``) use. ``val`` is a
    validation slice held back from that pool: other tasks of the pool's structures, to choose
    settings on without touching ``test``; asking for it leaves ``rl`` as it was. The test split
    does not depend on the other counts; the train split depends on whether a pool is asked for
    (the pool takes a share of its structures). ``flawed_share`` of the train rows get a solution
    that drops the last step (module docstring); the other splits do not depend on it.
    """
    _check_share(flawed_share)
    pool = _pool_counts(counts)
    num = _choose_specs(NUM, {s: (n + 1) // 2 for s, n in pool.items()}, max_ops, seed)
    lists = _choose_specs(LIST, {s: n // 2 for s, n in pool.items()}, max_ops, seed)
    rows = _hold_back_validation(
        {split: _alternate(num[split], lists[split]) for split in pool}, counts
    )
    return {
        split: [
            _render_python(
                spec, inputs, f"toy_python/{split}/{i}", _flawed(spec, split, flawed_share, seed)
            )
            for i, (spec, inputs) in enumerate(rows[split])
        ]
        for split in counts
    }


def toy_cpp_splits(
    counts: dict[str, int], max_ops: int = 3, seed: int = 42, flawed_share: float = 0.0
) -> dict:
    """C++ stdin/stdout tasks per split, as ``toy_python_splits``."""
    _check_share(flawed_share)
    rows = _hold_back_validation(_choose_specs(CPP, _pool_counts(counts), max_ops, seed), counts)
    return {
        split: [
            _render_cpp(
                spec, inputs, f"toy_cpp/{split}/{i}", _flawed(spec, split, flawed_share, seed)
            )
            for i, (spec, inputs) in enumerate(rows[split])
        ]
        for split in counts
    }


def _pool_counts(counts: dict[str, int]) -> dict[str, int]:
    """The counts to draw: a validation slice is drawn as the tail of a larger RL pool.

    Drawn that way, the pool's first ``rl`` tasks are the ones a request without ``val`` gets, so
    holding a slice back changes no training file.
    """
    pool = {split: n for split, n in counts.items() if split != "val"}
    if counts.get("val", 0) > 0:
        if pool.get("rl", 0) <= 0:
            raise UserError("a validation slice is held back from the RL pool: ask for rl > 0")
        pool["rl"] += counts["val"]
    return pool


def _hold_back_validation(rows: dict[str, list], counts: dict[str, int]) -> dict[str, list]:
    """``rows`` with the tail of the drawn RL pool moved to ``val`` (see ``_pool_counts``)."""
    if "val" not in counts:
        return rows
    pool, kept = rows.get("rl", []), counts.get("rl", 0)
    return {**rows, "rl": pool[:kept], "val": pool[kept:]}


def _alternate(first: list, second: list) -> list:
    mixed = [item for pair in zip(first, second) for item in pair]
    return mixed + first[len(second) :] + second[len(first) :]


def _unit(seed: int, salt: str, key) -> float:
    digest = hashlib.sha256(f"{seed}:{salt}{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _check_share(share: float) -> None:
    if not 0.0 <= share <= 1.0:
        raise UserError(f"the share of flawed demonstrations must be in [0, 1], got {share}")


def _flawed(spec: Spec, split: str, share: float, seed: int) -> bool:
    """Whether this task's demonstration drops its last step (train rows only)."""
    return split == "train" and _unit(seed, "flaw:", spec) < share


def split_of(spec: Spec, seed: int, with_rl: bool = False) -> str:
    """Train, test (or rl): set by the structure (2+ steps) or by the step and its constant (1 step)."""
    key = spec.structure() if len(spec.steps) > 1 else (spec.family, spec.steps, spec.final)
    if _unit(seed, "", key) < HOLDOUT_SHARE:
        return "test"
    if with_rl and _unit(seed, "rl:", key) < RL_SHARE:
        return "rl"
    return "train"


def _choose_specs(
    family: Family, counts: dict[str, int], max_ops: int, seed: int
) -> dict[str, list[tuple[Spec, list]]]:
    """Distinct specs with their test inputs, per split, drawn from the family's own stream."""
    label = f"toy {family.name} tasks"
    unknown = set(counts) - {"train", "test", "rl"}
    if unknown:
        raise UserError(f"{label}: unknown split(s) {', '.join(sorted(unknown))}")
    if max_ops < 1 or any(n < 0 for n in counts.values()):
        raise UserError(f"{label}: need max_ops >= 1 and non-negative task counts")
    rng = random.Random(f"coderl-toy:{family.name}:{seed}")
    quota = {"train": 0, "test": 0, "rl": 0, **counts}
    with_rl = quota["rl"] > 0
    chosen: dict[str, list[tuple[Spec, list]]] = {split: [] for split in quota}
    tried: set[Spec] = set()
    # Duplicates and full quotas cost a draw; this bound only stops a request that cannot be met.
    for _ in range(200 * sum(quota.values()) + 1000):
        if all(len(chosen[split]) >= quota[split] for split in quota):
            return {split: chosen[split] for split in counts}
        spec = family.sample_spec(rng, max_ops)
        split = split_of(spec, seed, with_rl)
        if spec in tried or len(chosen[split]) >= quota[split]:
            continue
        tried.add(spec)
        # Each spec's inputs have their own stream: a split never shifts another one's draws.
        inputs = _pick_inputs(spec, random.Random(f"coderl-toy-inputs:{seed}:{spec!r}"))
        if inputs is not None:
            chosen[split].append((spec, inputs))
    wanted = " + ".join(f"{n} {split}" for split, n in counts.items())
    raise UserError(
        f"{label}: cannot make {wanted} distinct tasks with"
        f" max_ops={max_ops} (lower the counts or raise max_ops)"
    )


def _family(spec: Spec) -> Family:
    return FAMILIES[spec.family]


def _pick_inputs(spec: Spec, rng: random.Random) -> list | None:
    """Inputs on which every step and constant matters and the outputs vary; None if no draw
    achieves it."""
    family = _family(spec)
    for _ in range(INPUT_DRAWS):
        inputs = [family.sample_input(rng) for _ in range(INPUTS_PER_TASK)]
        if len({repr(value) for value in inputs}) < len(inputs):
            continue
        outputs = [family.run(spec, value) for value in inputs]
        if len({repr(out) for out in outputs}) < 2 or _too_large(outputs):
            continue
        if all(
            [family.run(variant, value) for value in inputs] != outputs
            for variant in spec.variants()
        ):
            return inputs
    return None


def _too_large(outputs: list) -> bool:
    flat = [v for out in outputs for v in (out if isinstance(out, list) else [out])]
    return any(abs(v) > MAX_ABS_VALUE for v in flat)


def function_name(spec: Spec) -> str:
    """``num_add_mul`` / ``list_gt_add_sum``: the prefix keeps ``abs`` or ``max`` from shadowing."""
    names = [name for name, _ in spec.steps]
    if spec.family == "list":
        names.append(spec.final)
    return "_".join([spec.family, *names])


def _step_lines(spec: Spec, field: str) -> list[str]:
    steps = _family(spec).steps
    return [getattr(steps[name], field).format(k=k) for name, k in spec.steps]


def _render_python(spec: Spec, inputs: list, task_id: str, flawed: bool = False) -> dict:
    """A function task; ``flawed``: the solution drops the last step (prompt and tests do not)."""
    family = _family(spec)
    final = family.finals[spec.final]
    arg, noun = ("x", "integer") if spec.family == "num" else ("xs", "list of integers")
    name = function_name(spec)
    sentences = [f"Start from the {noun} {arg}.", *_step_lines(spec, "phrase"), final.phrase]
    docstring = "\n    ".join(sentences)
    prompt = f'def {name}({arg}):\n    """{docstring}\n    """\n'
    solved = spec.without_step(len(spec.steps) - 1) if flawed else spec
    body = [*_step_lines(solved, "code"), final.code]
    asserts = [
        f"    assert candidate({value!r}) == {family.run(spec, value)!r}" for value in inputs
    ]
    task = {
        "task_id": task_id,
        "prompt": prompt,
        "entry_point": name,
        "canonical_solution": "".join(f"    {line}\n" for line in body),
        "test": "def check(candidate):\n" + "\n".join(asserts) + "\n",
        "language": "python",
    }
    return {**task, "flaw": FLAW} if flawed else task


CPP_TEMPLATE = """#include <algorithm>
#include <iostream>
using namespace std;

int main() {{
    long long n, x, s = 0;
    cin >> n;
    for (long long i = 0; i < n; i++) {{
        cin >> x;
{body}    }}
{after}    return 0;
}}
"""


def _render_cpp(spec: Spec, inputs: list[list[int]], task_id: str, flawed: bool = False) -> dict:
    """A stdin/stdout task; ``flawed`` as in ``_render_python``."""
    final = CPP_FINALS[spec.final]
    solved = spec.without_step(len(spec.steps) - 1) if flawed else spec
    statement = "\n".join(
        [
            "Read an integer n and then n integers.",
            "Apply these steps to each integer x:",
            *_step_lines(spec, "phrase"),
            final.phrase,
        ]
    )
    body = "".join(f"        {line}\n" for line in [*_step_lines(solved, "code"), final.code])
    after = "" if spec.final == "each" else "    cout << s << endl;\n"
    tests = [
        {
            "input": f"{len(values)}\n{' '.join(map(str, values))}\n",
            "output": _cpp_output(spec, values),
        }
        for values in inputs
    ]
    task = {
        "task_id": task_id,
        "prompt": statement + "\n",
        "language": "cpp",
        "tests": tests,
        "canonical_solution": CPP_TEMPLATE.format(body=body, after=after),
    }
    return {**task, "flaw": FLAW} if flawed else task


def _cpp_output(spec: Spec, values: list[int]) -> str:
    result = CPP.run(spec, values)
    lines = result if isinstance(result, list) else [result]
    return "".join(f"{v}\n" for v in lines)
