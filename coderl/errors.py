"""The one exception type that means "the user gave us something wrong".

Scripts catch :class:`UserError` at the top level and print a single line naming the problem
(``error: <message>``) with exit status 2, instead of a traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed row, an unknown option value."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Decorate a script's ``main`` so a :class:`UserError` becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
