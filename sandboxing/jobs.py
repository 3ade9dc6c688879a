"""Jobs: a (task, completion) pair checked against the task schema and turned into the plain
data a worker runs, with the key the result cache uses."""

from __future__ import annotations

import hashlib
import json

from .constants import GRACE_AFTER_EXIT


def task_kind(task: dict) -> str:
    """``"stdio"`` if the task has a ``"tests"`` list, else ``"function"``."""
    return "stdio" if isinstance(task.get("tests"), list) else "function"


def make_job(task: dict, completion: str, limits: dict) -> dict:
    """The job a worker runs for (task, completion) under ``limits``, with its cache key;
    TypeError or ValueError naming the problem for a malformed task."""
    if not isinstance(task, dict):
        raise TypeError(f"a task must be a dict, got {type(task).__name__}")
    if not isinstance(completion, str):
        raise TypeError(f"a completion must be a str, got {type(completion).__name__}")
    job = _function_job(task, completion) if task_kind(task) == "function" else None
    if job is None:
        job = _stdio_job(task, completion)
    job["limits"] = limits
    job["key"] = _job_key(job)
    return job


def _function_job(task: dict, completion: str) -> dict:
    task_id = task.get("task_id")
    for field in ("prompt", "test", "entry_point"):
        if not isinstance(task.get(field), str):
            raise ValueError(f"function task {task_id!r}: field {field!r} must be a string")
    if (task.get("language") or "python") != "python":
        raise ValueError(f"function task {task_id!r}: language must be 'python'")
    return {
        "kind": "function",
        "task_id": str(task_id),
        "prompt": task["prompt"],
        "test": task["test"],
        "entry_point": task["entry_point"],
        "completion": completion,
    }


def _stdio_job(task: dict, completion: str) -> dict:
    task_id = task.get("task_id")
    language = {"c++": "cpp", "cpp": "cpp", "python": "python"}.get(str(task.get("language")))
    if language is None:
        raise ValueError(f"stdio task {task_id!r}: language must be 'cpp' or 'python'")
    tests = task["tests"]
    if not tests:
        raise ValueError(f"stdio task {task_id!r}: the tests list is empty")
    for i, test in enumerate(tests):
        if not (
            isinstance(test, dict)
            and isinstance(test.get("input"), str)
            and isinstance(test.get("output"), str)
        ):
            raise ValueError(f"stdio task {task_id!r}: tests[{i}] needs string input and output")
    tolerance = task.get("tolerance")
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0
    ):
        raise ValueError(f"stdio task {task_id!r}: tolerance must be a non-negative number")
    return {
        "kind": "stdio",
        "task_id": str(task_id),
        "language": language,
        "tests": [{"input": t["input"], "output": t["output"]} for t in tests],
        "tolerance": None if tolerance is None else float(tolerance),
        "completion": completion,
    }


def _job_key(job: dict) -> str:
    """Cache key: everything that can change the verdict (task content, completion, limits)."""
    fields = {k: v for k, v in job.items() if k not in ("task_id", "key")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def reply_wait_limit(job: dict) -> float:
    """How long the parent waits for a worker's reply before declaring the worker hung."""
    limits = job["limits"]
    if job["kind"] == "function":
        return limits["timeout"] + 15.0
    runs = len(job["tests"]) * (limits["timeout"] + GRACE_AFTER_EXIT + 1.0)
    return limits["compile_timeout"] + runs + 15.0
