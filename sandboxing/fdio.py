"""File-descriptor I/O: whole reads and writes on descriptors and files, and a capped buffer."""

from __future__ import annotations

import os

_CHUNK = 1 << 20


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_exact(fd: int, size: int) -> bytes | None:
    """``size`` bytes, or None if the stream ends first."""
    chunks = []
    while size:
        chunk = os.read(fd, min(size, _CHUNK))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_all(fd: int) -> bytes:
    """Everything up to the end of the stream."""
    chunks = []
    while chunk := os.read(fd, _CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def write_file(path: str, data: bytes, mode: int | None = None) -> None:
    """With ``mode``: create the file, which must not exist yet (nor be a link), with that mode.
    Without: write to a file that exists (a setting under ``/proc``)."""
    flags = os.O_WRONLY | os.O_CLOEXEC
    if mode is not None:
        flags |= os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(path, flags, mode or 0)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return read_all(fd)
    finally:
        os.close(fd)


class HeadTail:
    """Keeps the first and the last bytes of a stream (compiler errors come first)."""

    def __init__(self, head: int, tail: int):
        self.head, self.tail = bytearray(), bytearray()
        self.head_size, self.tail_size = head, tail

    def extend(self, data: bytes) -> None:
        room = self.head_size - len(self.head)
        if room > 0:
            self.head.extend(data[:room])
            data = data[room:]
        self.tail.extend(data)
        if len(self.tail) > self.tail_size:
            del self.tail[: len(self.tail) - self.tail_size]

    def text(self) -> str:
        return (bytes(self.head) + bytes(self.tail)).decode(errors="replace")
