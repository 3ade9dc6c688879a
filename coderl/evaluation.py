"""Scoring plumbing for evaluation: pass@k, result rows, summaries and the comparison table.

The verdicts come from :mod:`sandbox`; this module only counts them.
"""

from __future__ import annotations

import ast
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from coderl.errors import UserError


def table_header(k: int = 1) -> str:
    """The markdown table's header: the seed's columns for k = 1; for k > 1 the score is pass@k
    and the count is of tasks that any sample solved (with n = k samples, pass@k itself)."""
    count = "#passed" if k == 1 else "#solved"
    return (
        f"| Model / Checkpoint | Method | pass@{k} | {count} / #tasks | Avg. length |\n"
        "|---|---|:---:|:---:|:---:|"
    )


TABLE_HEADER = table_header(1)
_FENCE_LINE = re.compile(r"^[ \t]*```", re.M)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    ``n`` samples of which ``c`` passed. Computed as a product to stay exact for large n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n} c={c}")
    if k <= 0 or k > n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def result_row(sample: dict, result) -> dict:
    """One line of results.jsonl: the sample's identity plus the sandbox's verdict."""
    row = {
        "task_id": sample["task_id"],
        "completion_id": sample["completion_id"],
        "passed": result.passed,
        "status": result.status,
    }
    if result.tests_total is not None:
        row["tests_passed"] = result.tests_passed
        row["tests_total"] = result.tests_total
    if result.compiled is not None:
        row["compiled"] = result.compiled
    if result.detail:
        row["detail"] = result.detail
    if "num_tokens" in sample:
        row["num_tokens"] = sample["num_tokens"]
    return row


def code_to_score(task: dict, completion: str) -> tuple[str, bool]:
    """``(code, extracted)``: what the sandbox runs for a completion made elsewhere.

    Instruct models answer in a markdown fence. A completion with a fence line is scored as its
    fenced block, extracted exactly as generation's instruct mode does
    (:func:`coderl.prompts.extract_code`): always for a stdin/stdout program (a fence line is
    never valid C++ or a sensible Python program), and for a function task only when prompt +
    completion is not valid Python as it stands (a ``"```"`` inside a string stays code). The
    sandbox prepends the prompt to a function task's code, and the later definition wins.
    """
    from coderl.prompts import extract_code, task_kind, task_language

    if not _FENCE_LINE.search(completion):
        return completion, False
    if task_kind(task) == "function" and _parses(task.get("prompt", "") + completion):
        return completion, False
    return extract_code(completion, task_language(task)), True


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def score_samples(
    tasks: Sequence[dict], samples: Sequence[dict], sandbox, progress: bool = False
) -> list[dict]:
    """Run every sample through ``sandbox`` and return one result row per sample, in sample order.

    A fenced completion is scored as its block (:func:`code_to_score`); its row says so with
    ``"extracted": "fenced_block"``.
    """
    by_id = {t["task_id"]: t for t in tasks}
    prepared = [code_to_score(by_id[s["task_id"]], s["completion"]) for s in samples]
    jobs = [(by_id[s["task_id"]], code) for s, (code, _) in zip(samples, prepared, strict=True)]
    results = sandbox.run_batch(jobs, progress=progress)
    rows = []
    for sample, result, (_, extracted) in zip(samples, results, prepared, strict=True):
        row = result_row(sample, result)
        if extracted:
            row["extracted"] = "fenced_block"
        rows.append(row)
    return rows


def per_task_counts(results: Iterable[dict]) -> dict[str, tuple[int, int]]:
    """task_id -> (samples, passed), in first-seen order."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in results:
        c = counts[row["task_id"]]
        c[0] += 1
        c[1] += bool(row["passed"])
    return {tid: (n, p) for tid, (n, p) in counts.items()}


def summarize(results: Sequence[dict], ks: Sequence[int] = (1, 10, 100)) -> dict:
    """pass@k for every k that every task's sample count allows, plus counts per verdict.

    ``passed_tasks`` counts tasks whose first sample passed (the greedy convention), so with one
    sample per task ``pass@1 == passed_tasks / num_tasks`` exactly.
    """
    counts = per_task_counts(results)
    if not counts:
        return {"num_tasks": 0, "num_samples": 0, "pass@k": {}, "status_counts": {}}
    min_n = min(n for n, _ in counts.values())
    pass_k = {}
    for k in ks:
        if k <= min_n:
            pass_k[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
    first = {}
    for row in results:
        first.setdefault(row["task_id"], row)
    lengths = [row["num_tokens"] for row in results if "num_tokens" in row]
    summary = {
        "num_tasks": len(counts),
        "num_samples": len(results),
        "samples_per_task": min_n,
        "pass@k": pass_k,
        "passed_tasks": sum(bool(r["passed"]) for r in first.values()),
        "solved_tasks": sum(1 for _, c in counts.values() if c > 0),
        "status_counts": dict(sorted(Counter(r["status"] for r in results).items())),
        "avg_num_tokens": (sum(lengths) / len(lengths)) if lengths else None,
    }
    stdin_rows = [r for r in results if "tests_total" in r]
    if stdin_rows:
        summary["avg_test_fraction"] = sum(
            r["tests_passed"] / r["tests_total"] if r["tests_total"] else 0.0 for r in stdin_rows
        ) / len(stdin_rows)
    compiled = [r["compiled"] for r in results if "compiled" in r]
    if compiled:
        summary["compile_rate"] = sum(compiled) / len(compiled)
    return summary


def table_row(name: str, method: str, summary: dict, k: int = 1) -> str:
    """One row of the markdown table of ``table_header(k)`` (k = 1: the seed's columns)."""
    score = summary["pass@k"].get(f"pass@{k}", float("nan"))
    count = summary["passed_tasks"] if k == 1 else summary["solved_tasks"]
    avg = summary.get("avg_num_tokens")
    avg_text = "-" if avg is None else f"{avg:.2f}"
    return f"| `{name}` | {method} | {score:.3f} | {count} / {summary['num_tasks']} | {avg_text} |"


def add_table_row(table_path: Path, row: str, name: str, k: int = 1) -> None:
    """Append ``row`` to a markdown table, replacing an earlier row for the same checkpoint."""
    table_path.parent.mkdir(parents=True, exist_ok=True)
    check_table(table_path, k)
    lines = (
        table_path.read_text().splitlines() if table_path.exists() else table_header(k).splitlines()
    )
    key = f"| `{name}` |"
    lines = [line for line in lines if not line.startswith(key)] + [row]
    tmp = table_path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, table_path)


def check_table(table_path: Path, k: int) -> None:
    """A table that exists must hold pass@k rows: rows of another k would read as comparable."""
    header = table_header(k).splitlines()
    if table_path.exists() and table_path.read_text().splitlines()[: len(header)] != header:
        raise UserError(f"{table_path} is not a table of pass@{k} rows; use another --table")


def per_task_diff(a: Sequence[dict], b: Sequence[dict]) -> dict[str, list[str]]:
    """Which tasks each of two result sets solves that the other does not (by first sample)."""

    def solved(rows):
        first = {}
        for row in rows:
            first.setdefault(row["task_id"], row)
        return {tid for tid, r in first.items() if r["passed"]}, set(first)

    solved_a, tasks_a = solved(a)
    solved_b, tasks_b = solved(b)
    common = tasks_a & tasks_b
    return {
        "only_a": sorted((solved_a - solved_b) & common),
        "only_b": sorted((solved_b - solved_a) & common),
        "both": sorted(solved_a & solved_b),
        "neither": sorted(common - solved_a - solved_b),
    }


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a pass rate: how far one task moves the number."""
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def save_chart(rows: list[tuple[str, dict]], path: Path) -> None:
    """A bar chart of pass@1 and the average generated tokens of each (name, summary) row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [Path(name).name or name for name, _ in rows]
    p1 = [s["pass@k"].get("pass@1", 0.0) for _, s in rows]
    lengths = [s.get("avg_num_tokens") or 0.0 for _, s in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4))
    ax1.bar(names, p1, color="tab:blue")
    ax1.set_ylabel("pass@1")
    ax1.set_ylim(0, 1)
    for i, v in enumerate(p1):
        ax1.text(i, v + 0.01, f"{v:.3f}", ha="center")
    ax2.bar(names, lengths, color="tab:orange")
    ax2.set_ylabel("avg. generated tokens")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
