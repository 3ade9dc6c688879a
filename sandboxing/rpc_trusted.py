"""The trusted end of the function-call RPC, in the worker: the proxy that stands in for the
candidate function inside ``check``, and the channel that carries each call to the untrusted
process and brings back only plain data, within the run's deadline and output cap."""

from __future__ import annotations

import builtins
import os
import select
import time
from typing import Any

from .constants import MAX_REPLY_BYTES
from .fdio import HeadTail
from .processes import exit_if_parent_gone, watch_parent
from .verdicts import CANDIDATE_DIED, VERDICTS, RunEnded
from .wire import (
    FrameTooLarge,
    NotPlainData,
    clip,
    plain_dumps,
    plain_loads,
    read_frame,
    write_frame,
)


class CandidateError(Exception):
    """Stands in, inside ``check``, for an exception type that exists only in the candidate."""


class CandidateProxy:
    """Stands in for the candidate function inside check(): every call is an RPC."""

    def __init__(self, name: str, channel: CandidateChannel):
        self.__name__ = self.__qualname__ = name
        self._channel = channel

    def __call__(self, *args, **kwargs):
        return self._channel.call(args, kwargs)

    def __repr__(self) -> str:
        return f"<function {self.__name__} (sandboxed)>"


class CandidateChannel:
    """The worker's side of the RPC with one untrusted process. Every wait honours the deadline
    and drains the child's output, so nothing the child does can stall the worker."""

    def __init__(self, call_fd, reply_fd, output_fd, child, deadline, output_limit, parent_fd):
        self.call_fd, self.reply_fd, self.output_fd = call_fd, reply_fd, output_fd
        self.parent_fd = parent_fd
        self.child = child
        self.deadline = deadline
        self.output_limit = output_limit
        self.output_bytes = 0
        self.tail = HeadTail(0, 2048)
        self.poller = select.poll()
        for fd in (reply_fd, output_fd):
            self.poller.register(fd, select.POLLIN)
        if child.pidfd is not None:
            self.poller.register(child.pidfd, select.POLLIN)
        watch_parent(self.poller, parent_fd)

    def output_tail(self) -> str:
        return self.tail.text()

    def expect_setup(self) -> None:
        """The child's word that its set-up is done; anything else is the harness's fault."""
        try:
            message = self._next_message()
        except RunEnded as ended:
            if ended.status not in (CANDIDATE_DIED, "failed"):
                raise
            raise RunEnded("infra_error", f"the run's set-up failed {ended.detail}") from None
        if message != ("setup_ok",):
            raise RunEnded("infra_error", clip(f"the run's set-up failed: {message!r}"))

    def wait_loaded(self) -> None:
        message = self._next_message()
        if message == ("loaded",):
            return
        if isinstance(message, tuple) and len(message) == 3 and message[0] == "load_error":
            status = message[1] if message[1] in VERDICTS else "runtime_error"
            if status in ("passed", "infra_error"):  # the program cannot claim these
                status = "runtime_error"
            raise RunEnded(status, clip(message[2]))
        raise RunEnded("failed", "malformed message from the program")

    def call(self, args: tuple, kwargs: dict) -> Any:
        try:
            payload = plain_dumps(("call", args, kwargs))
        except NotPlainData as exc:
            raise RunEnded("infra_error", f"an argument is not plain data ({exc})") from None
        except Exception as exc:
            raise RunEnded("infra_error", f"an argument cannot be sent ({exc!r})") from None
        try:
            write_frame(self.call_fd, payload)
        except BrokenPipeError:
            raise RunEnded(CANDIDATE_DIED) from None
        return self._decode_reply(self._next_message(), args, kwargs)

    def _decode_reply(self, message: Any, args: tuple, kwargs: dict) -> Any:
        kind = message[0] if isinstance(message, tuple) and message else None
        if kind == "return" and len(message) == 4:
            _copy_back(args, message[2])
            _copy_back_kwargs(kwargs, message[3])
            return message[1]
        if kind == "raise" and len(message) == 4:
            raise _candidate_exception(*message[1:])
        if kind == "exit" and len(message) == 2:
            raise RunEnded("runtime_error", clip(f"the program called exit: {message[1]}"))
        if kind == "unsendable" and len(message) == 2:
            raise RunEnded("failed", clip(f"returned a value that is not plain data: {message[1]}"))
        if kind == "too_large":
            raise RunEnded("output_limit", f"the returned value exceeded {MAX_REPLY_BYTES} bytes")
        raise RunEnded("failed", "malformed reply from the program")

    def _next_message(self) -> Any:
        frame = self._next_frame()
        try:
            return plain_loads(frame)
        except NotPlainData as exc:
            raise RunEnded("failed", f"returned an object that is not plain data ({exc})") from None
        except RecursionError:
            raise RunEnded("failed", "returned a value nested too deeply") from None
        except Exception:
            raise RunEnded("failed", "malformed reply from the program") from None

    def _next_frame(self) -> bytes:
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise RunEnded("timeout")
            step = remaining if self.child.pidfd is not None else min(remaining, 0.05)
            events = dict(self.poller.poll(step * 1000))
            exit_if_parent_gone(events, self.parent_fd)
            if self.output_fd in events:
                self._drain_output()
            if self.reply_fd in events:
                return self._read_reply_frame()
            if self.child.pidfd in events or (self.child.pidfd is None and self.child.has_exited()):
                raise RunEnded(CANDIDATE_DIED)

    def _drain_output(self) -> None:
        data = os.read(self.output_fd, 1 << 16)
        if not data:
            self.poller.unregister(self.output_fd)
            return
        self.output_bytes += len(data)
        self.tail.extend(data)
        if self.output_bytes > self.output_limit:
            raise RunEnded("output_limit", f"output exceeded {self.output_limit} bytes")

    def _read_reply_frame(self) -> bytes:
        try:
            frame = read_frame(self.reply_fd, MAX_REPLY_BYTES)
        except FrameTooLarge:
            raise RunEnded("output_limit", f"the reply exceeded {MAX_REPLY_BYTES} bytes") from None
        if frame is None:
            raise RunEnded(CANDIDATE_DIED)
        return frame


def _copy_back(args: tuple, updates: Any) -> None:
    """Apply the candidate's in-place changes to top-level list/dict/set arguments."""
    if isinstance(updates, tuple):
        for item in updates:
            if isinstance(item, tuple) and len(item) == 2 and type(item[0]) is int:
                if 0 <= item[0] < len(args):
                    _replace_contents(args[item[0]], item[1])


def _copy_back_kwargs(kwargs: dict, updates: Any) -> None:
    if isinstance(updates, dict):
        for name, value in updates.items():
            if name in kwargs:
                _replace_contents(kwargs[name], value)


def _replace_contents(original: Any, new: Any) -> None:
    if type(original) is not type(new):
        return
    if type(original) is list:
        original[:] = new
    elif type(original) in (dict, set):
        original.clear()
        original.update(new)


def _candidate_exception(name: Any, text: Any, is_builtin: Any) -> BaseException:
    """Rebuild an exception raised by the candidate, marked so that escaping check() makes the
    run a runtime_error. Builtin exception types come back as themselves (tests may expect a
    ValueError); any other type becomes CandidateError."""
    name, text = clip(name, 100), clip(text)
    exc_type = getattr(builtins, name, None) if is_builtin is True else None
    exc: BaseException | None = None
    if isinstance(exc_type, type) and issubclass(exc_type, Exception):
        try:
            exc = exc_type(text)
        except Exception:
            exc = None
    if exc is None:
        exc = CandidateError(f"{name}: {text}" if text else name)
    exc._candidate_detail = f"{name}: {text}" if text else name  # type: ignore[attr-defined]
    return exc
