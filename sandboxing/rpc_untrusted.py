"""The untrusted end of the function-call RPC, run only in a function task's confined process:
load ``prompt + completion``, then answer each call with its return value (or the exception it
raised) as plain data."""

from __future__ import annotations

import builtins
import os
import pickle
from collections.abc import Callable

from .constants import DETAIL_CHARS, EXIT_MEMORY, MAX_REPLY_BYTES
from .wire import read_frame, write_frame


def serve_candidate(
    program: str,
    entry_point: str,
    _read_frame=read_frame,
    _write_frame=write_frame,
    _dumps=pickle.dumps,
    _loads=pickle.loads,
    _exit=os._exit,
    _len=len,
    _type=type,
    _tuple=tuple,
    _enumerate=enumerate,
    _mutable=(list, dict, set),
) -> None:
    """Body of a function task's untrusted process: load the program, then answer calls.

    What this loop needs is bound as default arguments before the program runs, so a program that
    patches builtins or modules can only spoil its own answers, never a verdict."""
    call_fd, reply_fd, protocol = 3, 4, pickle.HIGHEST_PROTOCOL

    def send(message: tuple) -> None:
        try:
            payload = _dumps(message, protocol)
        except BaseException as exc:
            payload = _dumps(
                ("unsendable", f"{_type(message[1]).__name__} ({_type(exc).__name__})")
            )
        if _len(payload) > MAX_REPLY_BYTES:
            payload = _dumps(("too_large",))
        _write_frame(reply_fd, payload)

    _write_frame(reply_fd, _dumps(("setup_ok",), protocol))  # before any untrusted code runs
    try:
        function = _load_candidate(program, entry_point, send)
        while True:
            frame = _read_frame(call_fd, 1 << 40)
            if frame is None:
                _exit(0)
            _, args, kwargs = _loads(frame)
            try:
                value = function(*args, **kwargs)
            except MemoryError:
                send(("raise", "MemoryError", "", True))
                continue
            except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
                send(("exit", describe_exception(exc)))
                continue
            except BaseException as exc:
                send(("raise", *_exception_fields(exc)))
                continue
            updates = _tuple((i, a) for i, a in _enumerate(args) if _type(a) in _mutable)
            kw_updates = {k: v for k, v in kwargs.items() if _type(v) in _mutable}
            send(("return", value, updates, kw_updates))
    except MemoryError:
        _exit(EXIT_MEMORY)


def _load_candidate(program: str, entry_point: str, send) -> Callable:
    """Compile and execute prompt + completion; report a load failure; return the entry point."""
    try:
        code = compile(program, "solution.py", "exec")
    except MemoryError:
        _finish_load(send, "memory_limit", "MemoryError while compiling the program")
    except (SyntaxError, ValueError, OverflowError, RecursionError) as exc:
        _finish_load(send, "syntax_error", describe_exception(exc))
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(code, namespace)
    except MemoryError:
        _finish_load(send, "memory_limit", "MemoryError while loading the program")
    except SystemExit as exc:
        _finish_load(send, "runtime_error", f"the program called exit({exc.code!r}) on load")
    except BaseException as exc:
        _finish_load(send, "runtime_error", describe_exception(exc))
    function = namespace.get(entry_point)
    if not callable(function):
        _finish_load(send, "runtime_error", f"NameError: {entry_point!r} is not defined")
    send(("loaded",))
    return function


def _finish_load(send, status: str, detail: str) -> None:
    send(("load_error", status, detail))
    os._exit(0)


def _exception_fields(exc: BaseException) -> tuple[str, str, bool]:
    exc_type = type(exc)
    try:
        name = str(exc_type.__name__)
        is_builtin = exc_type.__module__ == "builtins" and getattr(builtins, name, None) is exc_type
    except BaseException:
        name, is_builtin = "Exception", False
    try:
        text = str(exc)[:DETAIL_CHARS]
    except BaseException:
        text = "<unprintable>"
    return name, text, is_builtin


def describe_exception(exc: BaseException) -> str:
    name, text, _ = _exception_fields(exc)
    if isinstance(exc, SyntaxError) and exc.lineno:
        text = f"{exc.msg} (line {exc.lineno})"
    return f"{name}: {text}" if text else name
