"""Option parsing and seeding shared by every script.

Each script declares its options as dataclasses; :func:`parse_args` turns them into a
``transformers.HfArgumentParser`` that also accepts ``--config file.yaml`` (values in the file are
defaults, flags on the command line win). Wrong input ends in one line and exit status 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coderl.errors import UserError


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    description: str | None = None,
):
    """Parse ``argv`` into one instance per dataclass (a tuple, in the order given).

    ``--config x.yaml`` supplies defaults for any field of any of the dataclasses.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, description=description)
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
    return tuple(parsed)


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
