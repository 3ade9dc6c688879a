"""Rewards from sandbox verdicts, selected by name, with configurable weights.

Every reward maps (task, generated code, sandbox verdict) to a float. ``infra_error`` verdicts are
the harness's fault, never the model's: they are masked out of the loss (``mask`` False), not scored.

=============  ==============================================================================
``unit_test``  1 if every test passes else 0, minus ``length_alpha * generated_tokens / 100``
               (the RL-Code-Agent seed's length penalty; alpha 0 turns it off).
``partial``    stdin tasks: 0 compile failure, 0.5 compiles, 0.5 + 0.5 k/N with k of N tests
               passing, 1.0 all (the TinyLoRA seed). Function tasks have no per-test count: 1 pass,
               0.5 runs but fails, 0 does not compile.
``shaped``     +1 pass, +0.2 runs but fails, -0.5 syntax/compile/runtime error, 0 for
               timeout/memory/output limits (the seed gave these nothing explicit; rewarding an
               infinite loop like a wrong answer invites it), plus up to +0.2 of quality bonuses
               (docstring, line length, concise, type hints; 0.05 each, only for code that parses),
               as the Nano-Raccoon seed.
``weighted``   ``w_compile * compiled + w_correct * correctness + w_quality * quality`` with
               correctness the fraction of tests passed (1/0 for function tasks) and quality the
               four checks above as a fraction: the VeriGenLLM seed's weighted criteria without its
               external LLM judge.
=============  ==============================================================================
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from coderl.errors import UserError

ERROR_VERDICTS = {"syntax_error", "compile_error", "runtime_error"}
LIMIT_VERDICTS = {"timeout", "memory_limit", "output_limit"}


@dataclass
class RewardArgs:
    reward: str = field(
        default="auto",
        metadata={
            "help": "Reward function: unit_test, partial, shaped, weighted (see coderl/rewards.py); "
            "auto: partial for a task file with stdin/stdout tasks, else unit_test.",
            "choices": ["auto", "unit_test", "partial", "shaped", "weighted"],
        },
    )
    length_alpha: float = field(
        default=0.0,
        metadata={
            "help": "unit_test: subtract alpha * generated_tokens / 100 (seed: 0.01, 0.03).",
            "range": "[0, inf)",
        },
    )
    w_compile: float = field(
        default=0.2, metadata={"help": "weighted: weight of compiling.", "range": "[0, inf)"}
    )
    w_correct: float = field(
        default=0.7, metadata={"help": "weighted: weight of correctness.", "range": "[0, inf)"}
    )
    w_quality: float = field(
        default=0.1, metadata={"help": "weighted: weight of code quality.", "range": "[0, inf)"}
    )
    concise_lines: int = field(
        default=30,
        metadata={
            "help": "shaped/weighted: a solution of at most this many lines is concise.",
            "range": "[1, inf)",
        },
    )
    max_line_length: int = field(
        default=100,
        metadata={
            "help": "shaped/weighted: every line at most this long earns the bonus.",
            "range": "[1, inf)",
        },
    )


@dataclass
class Scored:
    """What a reward sees of one sample."""

    task: dict
    code: str  # the generated code as scored (completion for function tasks, program for stdin)
    num_tokens: int
    result: object  # sandbox.Result


def compiled(item: Scored) -> bool:
    if item.result.compiled is not None:
        return bool(item.result.compiled)
    return item.result.status not in {"syntax_error", "compile_error"}


def correctness(item: Scored) -> float:
    r = item.result
    if r.tests_total:
        return r.tests_passed / r.tests_total
    return 1.0 if r.passed else 0.0


def scored_source(item: Scored) -> str:
    """The source the quality checks read: for a function task the prompt plus the generated body
    (a body alone does not parse), for a stdin task the program."""
    if isinstance(item.task.get("tests"), list):
        return item.code
    return item.task.get("prompt", "") + item.code


def quality_checks(code: str, args: RewardArgs) -> dict[str, bool]:
    """Four cheap style checks; docstring and type hints only where the code parses as Python."""
    lines = [line for line in code.splitlines() if line.strip()]
    checks = {
        "line_length": all(len(line) <= args.max_line_length for line in lines),
        "concise": 0 < len(lines) <= args.concise_lines,
        "docstring": False,
        "type_hints": False,
    }
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        # C++ or a fragment: count comments as documentation and skip type hints.
        checks["docstring"] = "//" in code or "/*" in code
        return checks
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if ast.get_docstring(node):
                checks["docstring"] = True
            if node.returns is not None or any(a.annotation for a in node.args.args):
                checks["type_hints"] = True
    return checks


def reward_unit_test(items: Sequence[Scored], args: RewardArgs) -> list[float]:
    return [
        (1.0 if it.result.passed else 0.0) - args.length_alpha * it.num_tokens / 100 for it in items
    ]


def reward_partial(items: Sequence[Scored], args: RewardArgs) -> list[float]:
    out = []
    for it in items:
        r = it.result
        if r.passed:
            out.append(1.0)
        elif not compiled(it):
            out.append(0.0)
        else:
            out.append(0.5 + 0.5 * correctness(it))
    return out


def reward_shaped(items: Sequence[Scored], args: RewardArgs) -> list[float]:
    out = []
    for it in items:
        status = it.result.status
        if status == "passed":
            base = 1.0
        elif status in ERROR_VERDICTS:
            base = -0.5
        elif status in LIMIT_VERDICTS:
            base = 0.0
        else:
            base = 0.2
        bonus = 0.0
        if compiled(it):
            bonus = 0.05 * sum(quality_checks(scored_source(it), args).values())
        out.append(base + bonus)
    return out


def reward_weighted(items: Sequence[Scored], args: RewardArgs) -> list[float]:
    out = []
    for it in items:
        quality = sum(quality_checks(scored_source(it), args).values()) / 4 if compiled(it) else 0.0
        out.append(
            args.w_compile * float(compiled(it))
            + args.w_correct * correctness(it)
            + args.w_quality * quality
        )
    return out


REWARDS: dict[str, Callable[[Sequence[Scored], RewardArgs], list[float]]] = {
    "unit_test": reward_unit_test,
    "partial": reward_partial,
    "shaped": reward_shaped,
    "weighted": reward_weighted,
}


def resolve_reward(args: RewardArgs, tasks: Sequence[dict]) -> RewardArgs:
    """``auto`` -> partial when the tasks include stdin/stdout ones, else unit_test."""
    if args.reward != "auto":
        return args
    from coderl.prompts import task_kind

    stdio = any(task_kind(t) == "stdio" for t in tasks)
    return dataclasses.replace(args, reward="partial" if stdio else "unit_test")


def compute_rewards(items: Sequence[Scored], args: RewardArgs) -> tuple[list[float], list[bool]]:
    """Rewards and a loss mask (False for ``infra_error``: not the model's fault, not scored).
    ``auto`` is resolved from these items' tasks (a run resolves it once, from its task file)."""
    args = resolve_reward(args, [it.task for it in items])
    if args.reward not in REWARDS:
        raise UserError(f"unknown reward {args.reward!r}; choose from {', '.join(REWARDS)}")
    rewards = REWARDS[args.reward](items, args)
    if len(rewards) != len(items):
        raise RuntimeError(
            f"reward {args.reward!r} returned {len(rewards)} values for {len(items)} samples"
        )
    mask = [it.result.status != "infra_error" for it in items]
    rewards = [float(r) if m else 0.0 for r, m in zip(rewards, mask, strict=True)]
    return rewards, mask
