"""``call_in_process``: run a sync tool in a forked child that is killed when it times out.

A thread cannot be stopped, so a sync tool run with ``asyncio.to_thread`` keeps running (and
keeps its side effects coming) after its timeout. A forked child can be: it runs the function
in its own process group, sends back the result *text* (a ``str`` result as is, anything else
as JSON, so nothing but strings crosses the pipe), and on timeout or cancellation the whole
group is killed. The price of ``fork``: the tool sees a copy of the parent's memory, so its
in-memory side effects (appending to a list, a counter) do not reach the parent; files,
sockets and other processes do. A tool that needs shared in-memory state should be an
``async`` function (cancelled on timeout) or run with ``sync_tools="thread"``; so should a
tool that uses CUDA or OpenMP-threaded libraries, which may hang in a forked child (it is then
killed at its timeout).

Example:
    >>> import asyncio
    >>> asyncio.run(call_in_process(lambda a, b: a + b, {"a": 2, "b": 3}, timeout=60))
    '5'
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["ToolFailed", "call_in_process", "result_text"]

START_TIMEOUT = 60.0
"""Seconds a forked worker may take to start (a loaded machine); not part of the tool's time."""


class ToolFailed(RuntimeError):
    """The tool raised in its process (message ``"<ExceptionType>: <message>"``) or died."""


def result_text(result: Any) -> str:
    """What the model sees for a tool's return value: a ``str`` as is, else its JSON."""
    return result if isinstance(result, str) else json.dumps(result)


def _child(conn: Connection, fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    os.setpgrp()  # the parent kills the group: anything the tool spawns goes with it
    conn.send(("started", ""))
    try:
        payload = ("ok", result_text(fn(**kwargs)))
    except BaseException as exc:  # report, never hang the parent
        payload = ("error", f"{type(exc).__name__}: {exc}")
    conn.send(payload)
    conn.close()


def _wait(conn: Connection, timeout: float) -> tuple[str, str]:
    """The child's ``(status, text)``; ``TimeoutError`` if it takes longer than ``timeout``."""
    if not conn.poll(START_TIMEOUT):
        raise TimeoutError("the tool worker process did not start")
    try:
        conn.recv()  # "started": the tool's own time begins now
    except EOFError:
        return "error", "the tool worker process died without a result"
    if not conn.poll(timeout):
        raise TimeoutError
    try:
        return conn.recv()
    except EOFError:
        return "error", "the tool worker process died without a result"


async def call_in_process(fn: Callable[..., Any], kwargs: Mapping[str, Any],
                          timeout: float) -> str:
    """Run ``fn(**kwargs)`` in a forked child; return its result text.

    Args:
        fn: a sync function (a closure is fine: the child is a fork).
        kwargs: its keyword arguments.
        timeout: seconds the call may run, counted from the child's start.

    Returns:
        ``result_text(fn(**kwargs))``.

    Raises:
        TimeoutError: the call ran longer than ``timeout`` (its process group is killed).
        ToolFailed: ``fn`` raised (the message is ``"<ExceptionType>: <message>"``) or the
            child died.
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, fn, kwargs), daemon=True)
    process.start()
    sender.close()
    waiter = asyncio.get_running_loop().run_in_executor(None, _wait, receiver, timeout)
    try:
        status, text = await asyncio.shield(waiter)
    finally:  # done, timed out or cancelled: nothing of the call survives
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        with contextlib.suppress(BaseException):
            await waiter  # returns at once: the pipe is at EOF now
        process.join()
        receiver.close()
    if status != "ok":
        raise ToolFailed(text)
    return text
