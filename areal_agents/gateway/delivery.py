"""What reaches the client: capped request bodies, disconnect watching, delivered responses.

A completion is recorded in its session only as its answer is written whole to a client
that was still connected (``Delivery``). A client that gives up first (its timeout fired, it
disconnected) never saw the completion and its SDK may retry: recording it would add a turn
the agent never knew about, so it is counted as *abandoned* instead and its generation is
cancelled when it is still running.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .errors import GatewayError, bad_request

T = TypeVar("T")

BODY_LIMIT_SETTING = "Gateway(max_body_bytes=...) / areal-agents serve --max-body-bytes"


def too_large(size: int, limit: int) -> GatewayError:
    """The 413 error for a body of ``size`` bytes (at least) over ``limit``."""
    mib = f" ({limit / (1 << 20):g} MiB)" if limit >= 1 << 20 else ""
    return GatewayError(413, f"the request body is {size} bytes or more, over the gateway's "
                        f"limit of {limit} bytes{mib}; send a smaller request or raise the "
                        f"limit with {BODY_LIMIT_SETTING}", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it exceeds ``limit`` bytes (the declared
    ``Content-Length`` is checked before anything is read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range (JSON has no infinite numbers)")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (JSON has no NaN or Infinity); send a finite number")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body; NaN, Infinity and out-of-range numbers are refused (they
    could be stored but never served back as JSON).

    Raises:
        GatewayError: 400 ``invalid_json``.
    """
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}",
                          code="invalid_json") from exc
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


class Delivery:
    """Watches one request's connection from after its body was read until its response was
    sent: ``disconnected`` turns True when the client goes away before that."""

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self.sent = False
        self._watch = asyncio.ensure_future(self._until_disconnect(receive))

    @property
    def watch(self) -> asyncio.Future:
        """Done when the client disconnected, the response was sent, or ``close``."""
        return self._watch

    async def _until_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.sent:
                    self.disconnected = True
                return

    async def run(self, work: Awaitable[T]) -> T | None:
        """Await ``work``; None (``work`` cancelled) when the client disconnects first.

        When the request itself is cancelled (an in-process caller's task cancelled, a
        server shutting down), ``work`` is cancelled and awaited before the cancellation
        propagates: no generation outlives its request, to fail later on a closed engine
        with an exception nobody retrieves.
        """
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, self._watch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    def respond(self, response: Response, on_delivered: Callable[[], None],
                on_abandoned: Callable[[], None]) -> Response:
        """``response`` wrapped to call ``on_delivered`` once it was sent whole to a connected
        client, else ``on_abandoned``."""
        return _Delivered(self, response, on_delivered, on_abandoned)

    def close(self) -> None:
        """Stop watching."""
        self._watch.cancel()


SSE_DONE = b"data: [DONE]\n\n"
"""The event that completes a stream for the client (the SDK stops reading there)."""


def _completes(message: Message) -> bool:
    """Whether sending ``message`` hands the client the whole answer."""
    if message["type"] != "http.response.body":
        return False
    return not message.get("more_body") or bytes(message.get("body", b"")).endswith(SSE_DONE)


class _Delivered(Response):
    """Settles just before writing the chunk that completes the answer, if the client is
    still connected then: whoever holds the answer (the client, its next request, a reader
    in another thread) finds its turns recorded. A client that disconnected first (uvicorn
    then drops the write silently) or an answer that failed midway is abandoned."""

    def __init__(self, delivery: Delivery, inner: Response, on_delivered: Callable[[], None],
                 on_abandoned: Callable[[], None]) -> None:
        self.delivery, self.inner = delivery, inner
        self.on_delivered, self.on_abandoned = on_delivered, on_abandoned
        self.status_code, self.background = inner.status_code, None
        self.settled = False

    def _settle(self, delivered: bool) -> None:
        if not self.settled:
            self.settled = True
            (self.on_delivered if delivered else self.on_abandoned)()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        delivery = self.delivery

        async def tracked(message: Message) -> None:
            if _completes(message):
                delivery.sent = True
                self._settle(delivered=not delivery.disconnected)
            await send(message)

        try:
            await self.inner(scope, receive, tracked)
        finally:
            delivery.close()
            self._settle(delivered=False)  # no-op once the last chunk was sent
