"""Every numeric option of every script declares its range; parsing refuses values outside it.

The options of each script are found by running its ``main`` up to the point where it calls
``parse_args`` (a stand-in records the dataclasses and stops it there), so a new option, a new
option dataclass or a new script is covered without being listed here.
"""

from __future__ import annotations

import functools
import importlib
import math
import re

import pytest

from coderl.cli import RANGE_KEY, Range, numeric_fields, parse_args, parse_range
from coderl.errors import UserError
from tests.helpers import REPO, run_script

SCRIPTS = (
    "train_sft_lora",
    "train_rl_lora",
    "train_ppo_lora",
    "train_grpo_lora",
    "eval_humaneval",
    "prepare_data",
    "build_tiny_model",
    "plot_training",
    "prepare_model",
)
CONFIG_SCRIPTS = {
    "sft": "train_sft_lora",
    "reinforce": "train_rl_lora",
    "ppo": "train_ppo_lora",
    "grpo": "train_grpo_lora",
    "eval": "eval_humaneval",
}


class _Parsed(Exception):
    """Raised by the stand-in parse_args, carrying the dataclasses a script asked for."""


@functools.cache
def option_types(script: str) -> tuple[type, ...]:
    module = importlib.import_module(script)

    def record(dataclass_types, argv=None, description=None):
        raise _Parsed(tuple(dataclass_types))

    real, module.parse_args = module.parse_args, record
    try:
        module.main([])
    except _Parsed as parsed:
        return parsed.args[0]
    finally:
        module.parse_args = real
    raise AssertionError(f"{script}.main returned without parsing its options")


def ranged_options(script: str) -> list[tuple[str, type, Range]]:
    """(flag name, int or float, range) of every numeric option of the script that has a range."""
    options = {}
    for dataclass_type in option_types(script):
        for field, kind in numeric_fields(dataclass_type):
            if RANGE_KEY in field.metadata:
                options[field.name] = (field.name, kind, parse_range(field.metadata[RANGE_KEY]))
    return list(options.values())


def step_out(value: float, kind: type, direction: float) -> float:
    """The next value after ``value`` towards ``direction`` (+inf or -inf)."""
    return (
        value + int(math.copysign(1, direction))
        if kind is int
        else math.nextafter(value, direction)
    )


def outside_values(kind: type, allowed: Range) -> list[float]:
    """The values just outside each end of the range (an open end: the bound itself)."""
    values = []
    for bound, closed, away in (
        (allowed.low, allowed.low_closed, -math.inf),
        (allowed.high, allowed.high_closed, math.inf),
    ):
        if math.isinf(bound):
            if kind is float:
                values.append(bound)
        else:
            values.append(step_out(bound, kind, away) if closed else bound)
    return values


def bound_values(kind: type, allowed: Range) -> list[float]:
    """The values at each finite end of the range (an open end: the nearest value inside)."""
    values = []
    for bound, closed, inward in (
        (allowed.low, allowed.low_closed, math.inf),
        (allowed.high, allowed.high_closed, -math.inf),
    ):
        if not math.isinf(bound):
            values.append(bound if closed else step_out(bound, kind, inward))
    return values


def refusal(script: str, argv: list[str]) -> str | None:
    """The UserError message parsing ``argv`` for ``script`` gives, or None if it parses."""
    try:
        parse_args(option_types(script), argv)
    except UserError as err:
        return str(err)
    return None


def test_every_script_that_parses_options_is_covered():
    # Scripts whose options are dataclasses read by coderl.cli.parse_args; sandbox.py is
    # stdlib-only (its workers cannot import the library) and has a plain argparse CLI.
    uses_cli = re.compile(r"parse_args\(\s*\(")
    parsing = {
        path.stem for path in REPO.glob("*.py") if uses_cli.search(path.read_text(encoding="utf-8"))
    }
    assert parsing <= set(SCRIPTS), f"add to SCRIPTS: {sorted(parsing - set(SCRIPTS))}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_option_has_a_valid_range(script):
    missing, malformed = [], []
    for dataclass_type in option_types(script):
        for field, kind in numeric_fields(dataclass_type):
            where = f"{dataclass_type.__name__}.{field.name}"
            if RANGE_KEY not in field.metadata:
                missing.append(where)
                continue
            try:
                allowed = parse_range(field.metadata[RANGE_KEY])
            except ValueError as err:
                malformed.append(f"{where}: {err}")
                continue
            if kind is int and not all(
                math.isinf(b) or isinstance(b, int) for b in (allowed.low, allowed.high)
            ):
                malformed.append(f"{where}: an int option needs integer bounds")
    assert not missing, f"numeric options without a metadata {RANGE_KEY!r}: {missing}"
    assert not malformed, malformed


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_value_just_outside_the_range_is_refused_naming_option_and_range(script):
    wrong = []
    for name, kind, allowed in ranged_options(script):
        for value in outside_values(kind, allowed):
            message = refusal(script, [f"--{name}={value!r}"])
            expected = f"--{name} must be in {allowed.text}, got "
            if message is None or expected not in message or "\n" in message:
                wrong.append(f"--{name} {value!r}: {message!r}")
    assert not wrong, wrong


@pytest.mark.parametrize("script", SCRIPTS)
def test_values_at_the_bounds_and_the_defaults_are_accepted(script):
    assert refusal(script, []) is None
    wrong = []
    for name, kind, allowed in ranged_options(script):
        for value in bound_values(kind, allowed):
            message = refusal(script, [f"--{name}={value!r}"])
            if message is not None:
                wrong.append(f"--{name} {value!r}: {message}")
    assert not wrong, wrong


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_float_option_refuses_nan(script):
    floats = [name for name, kind, _ in ranged_options(script) if kind is float]
    refused = [name for name in floats if refusal(script, [f"--{name}", "nan"])]
    assert refused == floats


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_range(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(option_types(script), ["--help"])
    assert exit_info.value.code == 0
    # argparse wraps lines at spaces and hyphens: compare with all whitespace removed.
    text = "".join(capsys.readouterr().out.split())
    for name, _, allowed in ranged_options(script):
        assert "".join(f"Range: {allowed.text}.".split()) in text, name


def help_description(help_text: str) -> list[str]:
    """The non-blank lines of ``--help`` between the usage block and the first option's header."""
    lines = help_text.splitlines()
    usage_end = lines.index("")
    first_option = next(i for i, line in enumerate(lines) if line.startswith("  -"))
    return [line for line in lines[usage_end : first_option - 1] if line.strip()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_a_short_description_then_the_options(script, capsys):
    """``--help`` describes the script in a line or two, not with its whole docstring."""
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(["--help"])
    assert exit_info.value.code == 0
    description = help_description(capsys.readouterr().out)
    assert 1 <= len(description) <= 5, "\n".join(description)


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_exits_2_with_one_line_before_doing_anything(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # whatever a broken check lets through writes here, not in the repo
    if ranged := ranged_options(script):
        name, kind, allowed = ranged[0]
        value = outside_values(kind, allowed)[0]
        argv, message = (
            [f"--{name}={value!r}"],
            f"error: --{name} must be in {allowed.text}, got {value!r}",
        )
    else:  # no numeric option: an unknown one
        argv, message = (
            ["--no_such_option=1"],
            "error: unknown option(s): --no_such_option=1 (see --help)",
        )
    capsys.readouterr()  # drop what importing the script printed
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("save_every: 0\n", "--save_every must be in [1, inf), got 0"),
        ("save_every: 2.5\n", "--save_every must be an integer in [1, inf), got 2.5"),
        ("save_every: true\n", "--save_every must be an integer in [1, inf), got True"),
        ("learning_rate: [1]\n", "--learning_rate must be a number in (0, inf), got [1]"),
    ],
)
def test_config_file_values_are_checked_too(yaml, message, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml)
    assert refusal("train_grpo_lora", ["--config", str(config)]) == message


def test_shipped_configs_are_in_range():
    configs = sorted((REPO / "configs").glob("*/*.yaml"))
    checked = 0
    for config in configs:
        script = next((s for p, s in CONFIG_SCRIPTS.items() if config.stem.startswith(p)), None)
        if script is not None:
            assert refusal(script, ["--config", str(config)]) is None, config
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [
        ("[1, inf)", [1, 10**9], [0, -1, math.inf, math.nan]),
        ("(0, 1]", [5e-324, 0.5, 1], [0, 1.0000000000000002, -math.inf]),
        ("[0, 1)", [0, 0.999], [1, -5e-324]),
        ("(-inf, 0]", [-1e300, 0], [5e-324, -math.inf]),
    ],
)
def test_range_membership(text, inside, outside):
    allowed = parse_range(text)
    assert all(v in allowed for v in inside)
    assert not any(v in allowed for v in outside)


@pytest.mark.parametrize("text", ["1, inf", "[1, inf]", "[-inf, 0)", "[2, 1]", "[a, 1]", "[1 2]"])
def test_a_malformed_range_is_a_programming_error(text):
    with pytest.raises(ValueError):
        parse_range(text)


def test_save_every_0_as_a_user_runs_it(tmp_path):
    """The reported crash: a ZeroDivisionError traceback after the first step; now one line."""
    proc = run_script("train_grpo_lora.py", ["--save_every", "0", "--output_dir", "o"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --save_every must be in [1, inf), got 0"]
    assert not (tmp_path / "o").exists()


def test_out_of_range_config_value_as_a_user_runs_it(tmp_path):
    (tmp_path / "eval.yaml").write_text("top_p: 0\n")
    proc = run_script("eval_humaneval.py", ["--config", "eval.yaml"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --top_p must be in (0, 1], got 0"]
