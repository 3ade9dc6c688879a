"""Option parsing and seeding shared by every script.

Each script declares its options as dataclasses; :func:`parse_args` turns them into a
``transformers.HfArgumentParser`` that also accepts ``--config file.yaml`` (values in the file are
defaults, flags on the command line win). Wrong input ends in one line and exit status 2.

Every numeric option (``int``, ``float``, or either one ``| None``) states the values it accepts in
its field metadata, as an interval in the usual notation, with ``inf`` for no bound::

    save_every: int = field(default=50, metadata={"help": "...", "range": "[1, inf)"})
    top_p: float = field(default=1.0, metadata={"help": "...", "range": "(0, 1]"})

Square brackets include the bound, parentheses exclude it. :func:`parse_args` shows the range in
``--help`` and refuses a value outside it (from the command line or the ``--config`` file) with one
line naming the option and the range, before the script does anything else. ``None`` (the default of
an optional option) is not checked.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import random
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coderl.errors import UserError

RANGE_KEY = "range"
# Larger seeds would wrap around in numpy's 32-bit seeding (seed_everything): two seeds, one run.
SEED_RANGE = "[0, 4294967295]"


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    description: str | None = None,
):
    """Parse ``argv`` into one instance per dataclass (a tuple, in the order given).

    ``--config x.yaml`` supplies defaults for any field of any of the dataclasses.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _argument_parser(dataclass_types, description)
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML file whose keys are option names; flags given on the command line override it.",
    )
    parser.error = _raise_user_error  # one line naming the problem, not the usage block
    config_path = _pop_config_path(argv)
    if config_path is not None:
        parser.set_defaults(**_read_config(config_path, dataclass_types))
    namespace_and_rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    *parsed, remaining = namespace_and_rest
    if remaining:
        raise UserError(f"unknown option(s): {' '.join(remaining)} (see --help)")
    # The extra --config field is parsed into a namespace we do not need.
    parsed = [p for p in parsed if dataclasses.is_dataclass(p)]
    for options in parsed:
        check_ranges(options)
    return tuple(parsed)


# --------------------------------------------------------------------------- numeric ranges


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of allowed values, parsed from its text (see the module docstring)."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    def __contains__(self, value: float) -> bool:
        # Written so that NaN, which compares false with everything, falls outside every range.
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


_RANGE_PATTERN = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


def parse_range(text: str) -> Range:
    """``"[1, inf)"`` -> Range(1, inf, closed, open). A malformed text is a bug, not user input."""
    match = _RANGE_PATTERN.match(text)
    if not match:
        raise ValueError(f"range {text!r} is not an interval such as '[1, inf)' or '(0, 1]'")
    opening, low_text, high_text, closing = match.groups()
    low, high = _bound(low_text, text), _bound(high_text, text)
    infinite_included = (math.isinf(low) and opening == "[") or (
        math.isinf(high) and closing == "]"
    )
    if not low <= high or infinite_included:
        raise ValueError(f"range {text!r}: bounds out of order, or an infinite bound included")
    return Range(low, high, opening == "[", closing == "]", text)


def _bound(text: str, range_text: str) -> float:
    if text in ("inf", "-inf"):
        return float(text)
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"range {range_text!r}: {text!r} is not a number") from None


def numeric_fields(dataclass_type: type) -> list[tuple[dataclasses.Field, type]]:
    """The fields typed ``int`` or ``float`` (also ``X | None``), each with that type; not bool."""
    hints = typing.get_type_hints(dataclass_type)
    numeric = []
    for field in dataclasses.fields(dataclass_type):
        hint = hints[field.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            non_none = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            hint = non_none[0] if len(non_none) == 1 else None
        if hint in (int, float):
            numeric.append((field, hint))
    return numeric


def check_ranges(options: Any) -> None:
    """Raise a UserError naming the first numeric option whose value lies outside its range."""
    for field, kind in numeric_fields(type(options)):
        value = getattr(options, field.name)
        if value is not None and RANGE_KEY in field.metadata:
            _check_value(f"--{field.name}", value, kind, parse_range(field.metadata[RANGE_KEY]))


def _check_value(flag: str, value: Any, kind: type, allowed: Range) -> None:
    # Values from a --config file arrive as YAML typed them, not through argparse's conversion.
    accepted = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, accepted):
        noun = "an integer" if kind is int else "a number"
        raise UserError(f"{flag} must be {noun} in {allowed.text}, got {value!r}")
    if value not in allowed:
        raise UserError(f"{flag} must be in {allowed.text}, got {value!r}")


def _with_range_in_help(field: dataclasses.Field) -> dataclasses.Field:
    """A copy of ``field`` whose help ends with its range and whose metadata argparse accepts."""
    if RANGE_KEY not in field.metadata:
        return field
    metadata = dict(field.metadata)
    allowed = parse_range(metadata.pop(RANGE_KEY)).text
    metadata["help"] = f"{metadata.get('help', '').rstrip()} Range: {allowed}.".lstrip()
    shown = copy.copy(field)
    shown.metadata = types.MappingProxyType(metadata)
    return shown


def _argument_parser(dataclass_types: Sequence[type], description: str | None):
    from transformers import HfArgumentParser

    class RangedArgumentParser(HfArgumentParser):
        """HfArgumentParser hands every metadata key to add_argument, which knows no "range"."""

        @staticmethod
        def _parse_dataclass_field(parser, field):
            HfArgumentParser._parse_dataclass_field(parser, _with_range_in_help(field))

    return RangedArgumentParser(dataclass_types, description=description)


def _raise_user_error(message: str):
    raise UserError(f"{message} (see --help)")


def _pop_config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a YAML file path")
            path = argv[i + 1]
            del argv[i : i + 2]
            return path
        if arg.startswith("--config="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _read_config(path: str, dataclass_types: Sequence[type]) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    known = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return values


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is a dependency, but seeding must never be the thing that fails
        pass
    import torch

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def derive_seed(seed: int, *parts: int | str) -> int:
    """A stable 63-bit seed for one rollout, from the run seed and (step, index, ...)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
