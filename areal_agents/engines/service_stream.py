"""The engine server's ``POST /generate/stream``: a generation's tokens as server-sent events.

``token_stream`` runs ``engine.generate_streaming`` and answers once the first event exists:
``data: {"delta": ...}`` per ``TokenDelta`` in the order the engine produced them, then
``data: {"result": ...}`` (``/generate``'s answer) and ``data: [DONE]``. An exception before
the first delta is raised to the caller (the endpoint answers it with ``/generate``'s status);
after it, it is the last event, ``data: {"error": {"type", "message"}}``. The generation is
cancelled when the client disconnects, before its first token (a watcher on ``receive``) or
during the stream (Starlette cancels the body on ``http.disconnect``), and when the body is
closed for any other reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..errors import EngineError
from .base import GenerateRequest, GenerateResult, TokenDelta
from .service import delta_to_json, error_answer, result_to_json

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]
_END = None  # queued once the generation has ended (result or exception in its task)


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` as compact JSON."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def token_stream(engine: Any, request: GenerateRequest, receive: Receive) -> Any:
    """The ``StreamingResponse`` of ``request`` on ``engine`` (see the module docstring).

    Raises:
        Exception: whatever ``generate_streaming`` raised before its first delta (nothing was
            sent yet); the generation has ended.
    """
    from starlette.responses import Response, StreamingResponse

    queue: asyncio.Queue[TokenDelta | None] = asyncio.Queue()
    task = asyncio.ensure_future(engine.generate_streaming(request, queue.put_nowait))
    task.add_done_callback(lambda _: queue.put_nowait(_END))
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        first = asyncio.ensure_future(queue.get())
        await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not first.done():
            first.cancel()
        gone.cancel()
    if not first.done() or first.cancelled():  # the client left before any token
        _cancel(task, request.request_id, "before its first token")
        return Response(status_code=499)  # nobody reads it
    head = first.result()
    if head is _END and task.cancelled():
        raise EngineError("the generation was cancelled on the server (is it closing?)")
    if head is _END and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]  # answered as /generate's error
    return StreamingResponse(_events(head, queue, task, request.request_id),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _events(head: TokenDelta | None, queue: asyncio.Queue[TokenDelta | None],
                  task: asyncio.Future[GenerateResult], request_id: str) -> AsyncIterator[bytes]:
    """The body: deltas as they are queued (everything queued at a time in one write), then
    the result or the error; cancels the generation if it is closed before that."""
    item = head
    try:
        while item is not _END:
            parts = [sse({"delta": delta_to_json(item)})]
            while not queue.empty() and (item := queue.get_nowait()) is not _END:
                parts.append(sse({"delta": delta_to_json(item)}))
            yield b"".join(parts)
            if item is not _END:
                item = await queue.get()
        exc = task.exception()
        if exc is None:
            yield sse({"result": result_to_json(task.result())}) + b"data: [DONE]\n\n"
        else:
            _, kind, message = error_answer(exc)  # type: ignore[arg-type]
            yield sse({"error": {"type": kind, "message": message}})
    finally:
        if not task.done():
            _cancel(task, request_id, "mid-stream")


async def _disconnected(receive: Receive) -> None:
    """Return once the client has disconnected (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _cancel(task: asyncio.Future[Any], request_id: str, when: str) -> None:
    """Cancel a generation whose client is gone (``LocalEngine`` frees its rows at its next
    step; not awaited: this may run inside a cancelled scope)."""
    task.cancel()
    log.warning("request %s: the client disconnected %s; generation cancelled", request_id, when)
