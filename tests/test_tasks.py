"""Task I/O: round trips, validation, and one-line errors that name the file, line and field."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from coderl.errors import UserError
from coderl.tasks import append_jsonl, load_samples, load_tasks, read_jsonl, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures"

FUNCTION_TASK = {
    "task_id": "t/0",
    "prompt": "def f(x):\n",
    "entry_point": "f",
    "test": "def check(candidate):\n    assert candidate(1) == 2\n",
}
STDIO_TASK = {
    "task_id": "t/1",
    "prompt": "Print n + 1.",
    "language": "cpp",
    "tests": [{"input": "1\n", "output": "2\n"}],
}


def test_write_then_read_round_trips_rows_and_unicode(tmp_path):
    rows = [FUNCTION_TASK, {**STDIO_TASK, "prompt": "Print ≤ and ✓"}]
    path = tmp_path / "sub" / "dir" / "tasks.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    assert load_tasks(path) == rows
    assert path.read_text(encoding="utf-8").count("\n") == 2
    assert list(path.parent.iterdir()) == [path]  # the temp file was renamed, not left behind


def test_write_is_byte_identical_for_the_same_rows(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [FUNCTION_TASK, STDIO_TASK])
    write_jsonl(tmp_path / "b.jsonl", [FUNCTION_TASK, STDIO_TASK])
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_gzip_files_are_read_and_written(tmp_path):
    path = tmp_path / "tasks.jsonl.gz"
    write_jsonl(path, [FUNCTION_TASK])
    assert json.loads(gzip.decompress(path.read_bytes())) == FUNCTION_TASK
    assert load_tasks(path) == [FUNCTION_TASK]
    first = path.read_bytes()
    write_jsonl(path, [FUNCTION_TASK])
    assert path.read_bytes() == first  # zero mtime: reruns stay byte-identical


def test_append_adds_rows_after_existing_ones(tmp_path):
    path = tmp_path / "out" / "samples.jsonl"
    append_jsonl(path, [{"task_id": "a", "completion": "x"}])
    append_jsonl(path, [{"task_id": "a", "completion": "y"}, {"task_id": "b", "completion": "z"}])
    assert [row["completion"] for row in read_jsonl(path)] == ["x", "y", "z"]


def test_blank_lines_are_skipped_but_line_numbers_stay_physical():
    path = FIXTURES / "tasks_missing_field.jsonl"
    assert len(read_jsonl(path)) == 2
    with pytest.raises(UserError) as err:
        load_tasks(path)
    # Row 2 sits on physical line 3 (line 2 is blank); its first test has no 'output'.
    assert str(err.value) == f"{path}:3: tests[0] needs a string field 'output'"


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        ("tasks_bad_json.jsonl", ":2: not valid JSON (Expecting value)"),
        ("tasks_not_object.jsonl", ":1: expected a JSON object, got list"),
        ("tasks_empty.jsonl", ": file is empty (no JSON rows)"),
    ],
)
def test_malformed_files_name_the_file_and_line(fixture, message):
    path = FIXTURES / fixture
    with pytest.raises(UserError) as err:
        read_jsonl(path)
    assert str(err.value) == f"{path}{message}"
    assert "\n" not in str(err.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="file not found: .*nope.jsonl"):
        load_tasks(tmp_path / "nope.jsonl")


def test_a_truncated_gzip_file_is_a_user_error(tmp_path):
    path = tmp_path / "tasks.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(FUNCTION_TASK).encode())[:20])
    with pytest.raises(UserError, match="cannot be read"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task_id": None}, "missing field 'task_id'"),
        ({"task_id": 7}, "field 'task_id' must be a string, got int"),
        ({"task_id": ""}, "field 'task_id' is empty"),
        ({"prompt": None}, "missing field 'prompt'"),
        ({"entry_point": None}, "missing field 'entry_point'"),
        ({"test": None}, "missing field 'test'"),
        ({"test": "assert f(1) == 2\n"}, "field 'test' does not define check(candidate)"),
        ({"language": "java"}, "field 'language' must be one of python, cpp"),
        ({"language": "cpp"}, "a task without a 'tests' list is a Python function task"),
        ({"canonical_solution": 3}, "field 'canonical_solution' must be a string, got int"),
        ({"tests": "1 2"}, "field 'tests' must be a list of {input, output} objects"),
    ],
)
def test_function_task_validation_names_line_and_field(tmp_path, change, message):
    bad = {k: v for k, v in {**FUNCTION_TASK, **change}.items() if v is not None}
    path = tmp_path / "tasks.jsonl"
    write_jsonl(path, [STDIO_TASK, bad])
    with pytest.raises(UserError) as err:
        load_tasks(path)
    assert str(err.value) == f"{path}:2: {message}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"language": None}, "missing field 'language' (stdin/stdout tasks name it)"),
        ({"tests": []}, "field 'tests' is empty"),
        ({"tests": ["1"]}, "tests[0] must be an object with 'input' and 'output'"),
        ({"tests": [{"input": "1", "output": 2}]}, "tests[0] needs a string field 'output'"),
        ({"tolerance": "small"}, "field 'tolerance' must be a number"),
    ],
)
def test_stdio_task_validation_names_line_and_field(tmp_path, change, message):
    bad = {k: v for k, v in {**STDIO_TASK, **change}.items() if v is not None}
    path = tmp_path / "tasks.jsonl"
    write_jsonl(path, [bad])
    with pytest.raises(UserError) as err:
        load_tasks(path)
    assert str(err.value) == f"{path}:1: {message}"


def test_stdio_task_with_tolerance_and_python_language_is_valid(tmp_path):
    task = {**STDIO_TASK, "language": "python", "tolerance": 1e-6}
    write_jsonl(tmp_path / "t.jsonl", [task])
    assert load_tasks(tmp_path / "t.jsonl") == [task]


def test_duplicate_task_id_names_both_lines(tmp_path):
    path = tmp_path / "tasks.jsonl"
    write_jsonl(path, [FUNCTION_TASK, STDIO_TASK, {**STDIO_TASK, "prompt": "again"}])
    with pytest.raises(UserError) as err:
        load_tasks(path)
    assert str(err.value) == f"{path}:3: duplicate task_id 't/1' (first on line 2)"


def test_samples_get_completion_ids_per_task_in_file_order(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [
        {"task_id": "a", "completion": "1"},
        {"task_id": "b", "completion": "2"},
        {"task_id": "a", "completion": "3"},
        {"task_id": "a", "completion": "4", "completion_id": 9},
    ]
    write_jsonl(path, rows)
    samples = load_samples(path)
    assert [(s["task_id"], s["completion_id"]) for s in samples] == [
        ("a", 0),
        ("b", 0),
        ("a", 1),
        ("a", 9),
    ]
    assert "completion_id" not in rows[0]  # the caller's rows are not mutated


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"task_id": "a"}], ":1: missing field 'completion'"),
        ([{"completion": "x"}], ":1: missing field 'task_id'"),
        ([{"task_id": "a", "completion": "x", "completion_id": "0"}], ":1: field 'completion_id'"),
        (
            [
                {"task_id": "a", "completion": "x"},
                {"task_id": "a", "completion": "y", "completion_id": 0},
            ],
            ":2: duplicate sample 'a' completion_id 0 (first on line 1)",
        ),
    ],
)
def test_bad_samples_name_line_and_field(tmp_path, rows, message):
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(UserError) as err:
        load_samples(path)
    assert str(err.value).startswith(f"{path}{message}")
