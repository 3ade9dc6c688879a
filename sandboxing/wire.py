"""The wire format between the parent, the workers and the untrusted processes: length-prefixed
frames, and pickles that may hold plain data only (None, bool, int, float, complex, str, bytes,
bytearray, list, tuple, dict, set, frozenset), checked on both ends of the trust boundary."""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

from .constants import DETAIL_CHARS
from .fdio import read_exact, write_all

_HEADER = struct.Struct("!Q")


class FrameTooLarge(Exception):
    pass


class NotPlainData(Exception):
    """A value that is not plain data was about to cross the trust boundary."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles builtin plain values only: every class reference is refused."""

    def find_class(self, module, name):
        if (module, name) == ("builtins", "complex"):
            return complex
        raise NotPlainData(f"{module}.{name}")


class _PlainPickler(pickle.Pickler):
    """Pickles builtin plain values only. ``reducer_override`` is called for every object that
    is not None, a bool or an exact int/float/bytes/str/dict/set/frozenset/list/tuple."""

    def reducer_override(self, obj):
        if type(obj) in (complex, bytearray) or obj is complex:  # complex pickles via its class
            return NotImplemented
        raise NotPlainData(type(obj).__name__)


def plain_loads(data: bytes) -> Any:
    return _PlainUnpickler(io.BytesIO(data)).load()


def plain_dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _PlainPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def write_frame(fd: int, payload: bytes) -> None:
    write_all(fd, _HEADER.pack(len(payload)) + payload)


def read_frame(fd: int, limit: int) -> bytes | None:
    """One length-prefixed frame; None at end of file; FrameTooLarge above ``limit`` bytes."""
    header = read_exact(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > limit:
        raise FrameTooLarge(size)
    return read_exact(fd, size)


def clip(text: Any, limit: int = DETAIL_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
