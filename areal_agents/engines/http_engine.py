"""``HTTPEngine``: what every engine behind an HTTP server shares (lifecycle and error mapping).

``RemoteEngine`` (our engine server), ``VLLMEngine`` and ``SGLangEngine`` subclass it; they
add their endpoints and response parsing. This base owns, once:

* the ``httpx2`` client (``url``, per-request ``timeout_s``, an optional test transport);
* an optional launched ``ServerProcess``, stopped by ``close`` (idempotent; ``async with``);
* the request checks every engine makes before sending (closed, empty prompt, context);
* streamed answers (``_stream``: the JSON of each server-sent ``data:`` event until
  ``[DONE]``; closing it closes the HTTP stream, which servers take as an abort);
* how failures surface: a timeout is ``EngineTimeout``; a refused connection to an attached
  server, or any transport error once a launched server has exited, is ``EngineUnavailable``
  (the gateway drops the replica); other transport errors and HTTP errors are ``EngineError``
  with the server's message and, for a launched server, its last log lines.

Example:
    >>> import httpx2
    >>> engine = HTTPEngine("http://h:1/", timeout_s=5.0, transport=httpx2.MockTransport(
    ...     lambda r: httpx2.Response(500, json={"error": {"message": "boom"}})))
    >>> engine.url
    'http://h:1'
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import httpx2

from ..errors import ContextLengthExceeded, EngineError, EngineTimeout, EngineUnavailable
from .base import GenerateRequest, InferenceEngine
from .server_process import ServerProcess


def error_message(response: httpx2.Response) -> str:
    """The message of an error body: ``{"error": {"message"}}``, ``{"error": str}``,
    FastAPI's ``{"detail"}``, or ``{"message"}`` (e.g. SGLang's ``{"success": false,
    "message"}``); the raw text otherwise."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if not isinstance(body, dict):
        return str(body)
    error = body.get("error", body.get("detail", body.get("message", body)))
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)


class HTTPEngine(InferenceEngine):
    """An ``InferenceEngine`` whose work happens in a server reached over HTTP.

    Args:
        url: base URL of the server (a trailing ``/`` is dropped).
        timeout_s: seconds one HTTP request may take (a whole generation included).
        server: the ``ServerProcess`` this engine owns (stopped by ``close``); None when
            attached to a server started elsewhere.
        transport: an ``httpx2`` transport (tests pass ``httpx2.MockTransport``).
        headers: headers of every request (e.g. a bearer token).

    Subclasses set ``server_name`` (how messages name the server) and may set
    ``retry_transport_errors`` (retry a request once after a transport error while the server
    still runs; only safe when re-sending every request is harmless).
    """

    server_name: ClassVar[str] = "server"
    retry_transport_errors: ClassVar[bool] = False

    def __init__(self, url: str, *, timeout_s: float = 600.0,
                 server: ServerProcess | None = None,
                 transport: httpx2.AsyncBaseTransport | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.server = server
        self._http_transport = transport
        self._http = self._client(headers)
        self._pending = 0
        self._closed = False

    def _client(self, headers: dict[str, str] | None) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(base_url=self.url, transport=self._http_transport,
                                  timeout=self.timeout_s, headers=headers)

    async def _reconnect(self, url: str, headers: dict[str, str] | None = None) -> None:
        """Point the engine at a new server URL (a restarted server) with a fresh client."""
        await self._http.aclose()
        self.url = url.rstrip("/")
        self._http = self._client(headers)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once closed or once a launched server has exited (attached: assumed alive)."""
        return not self._closed and (self.server is None or self.server.running)

    @property
    def num_pending(self) -> int:
        return self._pending

    async def close(self) -> None:
        """Close the HTTP client, stop a launched server, then ``_release``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._http.aclose()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        await self._release()

    async def _release(self) -> None:
        """Free what a subclass holds besides the client and server (files, shared memory)."""

    # -- requests -----------------------------------------------------------------------------

    def _check_request(self, request: GenerateRequest) -> None:
        """Refuse what no server would serve, before sending anything.

        Raises:
            EngineError: the engine is closed, or the prompt is empty.
            ContextLengthExceeded: ``len(prompt_ids) + max_tokens > max_context``.
        """
        if self._closed:
            raise EngineError(f"{type(self).__name__} is closed; create a new engine")
        ids, max_tokens = request.prompt_ids, request.sampling.max_tokens
        if not ids:
            raise EngineError("empty prompt: prompt_ids must hold at least one token id")
        if len(ids) + max_tokens > self.max_context:
            raise ContextLengthExceeded(
                f"prompt of {len(ids)} tokens + max_tokens {max_tokens} = "
                f"{len(ids) + max_tokens} exceeds the context window of {self.max_context} "
                "tokens; shorten the prompt or lower max_tokens")

    async def _request(self, method: str, path: str, body: Any = None, *,
                       params: dict[str, str] | None = None,
                       retry: bool | None = None) -> Any:
        """Send one request and return its JSON body.

        Args:
            retry: retry once after a transport error while the server runs (default:
                ``retry_transport_errors``).

        Raises:
            EngineTimeout: no answer within ``timeout_s``.
            EngineUnavailable: a launched server exited, or an attached one refuses connections.
            EngineError: another transport error, an HTTP error (``_http_error``), or a body
                that is not JSON.
        """
        what = f"{method} {path}"
        response = await self._send(method, path, body, params, what,
                                    self.retry_transport_errors if retry is None else retry)
        return self._decode(response, what)

    def _decode(self, response: httpx2.Response, what: str) -> Any:
        """The JSON body of ``response``; None when empty (e.g. SGLang's ``/abort_request``).
        An HTTP error raises ``_http_error``'s exception."""
        if response.status_code >= 400:
            raise self._http_error(response, what)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise EngineError(f"the {self.server_name} answered {what} with non-JSON: "
                              f"{response.text[:200]!r}") from exc

    async def _send(self, method: str, path: str, body: Any, params: dict[str, str] | None,
                    what: str, retry: bool) -> httpx2.Response:
        for attempt in range(2 if retry else 1):
            try:
                return await self._http.request(method, path, json=body, params=params)
            except httpx2.TransportError as exc:
                failure = await self._transport_failure(exc, what)
                if failure is None and attempt == 0 and retry:
                    continue  # e.g. a pooled keep-alive connection the server just closed
                raise (failure or self._unreachable(EngineError, exc, what)) from exc
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _transport_failure(self, exc: httpx2.TransportError,
                                 what: str) -> Exception | None:
        """The exception for a transport error: ``EngineTimeout`` for a timeout,
        ``EngineUnavailable`` when the server is gone; None when it may still be up (the
        caller retries or raises ``EngineError``)."""
        if isinstance(exc, httpx2.TimeoutException):
            return EngineTimeout(f"the {self.server_name} at {self.url} did not answer {what} "
                                 f"within {self.timeout_s:.0f} s; raise timeout_s or check "
                                 f"the server{self._log_hint()}")
        if self.server is not None:  # a dying server: let it exit so we can tell
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.server.proc.wait, 1.0)
        gone = (not self.server.running if self.server is not None
                else isinstance(exc, httpx2.ConnectError))
        return self._unreachable(EngineUnavailable, exc, what) if gone else None

    def _unreachable(self, kind: type[Exception], exc: Exception, what: str) -> Exception:
        return kind(f"cannot reach the {self.server_name} at {self.url} ({what}: "
                    f"{type(exc).__name__}: {exc}); is it running?{self._log_hint()}")

    async def _stream(self, path: str, body: Any, *,
                      client: httpx2.AsyncClient | None = None) -> AsyncIterator[Any]:
        """``POST path`` and yield the JSON of each server-sent ``data:`` event until
        ``[DONE]`` (OpenAI-style streaming, as vLLM, SGLang and our engine server send it),
        through ``client`` (default: the engine's own; its transport must hand the body
        over as it arrives for the events to be incremental).

        Closing the generator early (a cancelled caller) closes the HTTP stream: the server
        sees the disconnect and aborts the request. ``timeout_s`` bounds each wait for data,
        not the whole stream. Never retried (a generation must not run twice).

        Raises:
            EngineTimeout, EngineUnavailable, EngineError: as ``_request``; also an
                ``EngineError`` for an error event (``data: {"error": ...}``) or a body that
                is not JSON.
        """
        what = f"POST {path} (stream)"
        try:
            async with (client or self._http).stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._http_error(response, what)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, "event:" lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError as exc:
                        raise EngineError(f"the {self.server_name} streamed non-JSON in {what}: "
                                          f"{data[:200]!r}") from exc
                    if isinstance(event, dict) and event.get("error"):
                        error = event["error"]
                        message = error.get("message", error) if isinstance(error, dict) else error
                        raise EngineError(f"the {self.server_name} failed {what}: {message}"
                                          f"{self._log_hint()}")
                    yield event
        except httpx2.TransportError as exc:
            failure = await self._transport_failure(exc, what)
            raise (failure or self._unreachable(EngineError, exc, what)) from exc
        # a launched server that died may close the stream cleanly: that is a dead server too
        failure = await self._transport_failure(
            httpx2.RemoteProtocolError("the stream ended without [DONE]"), what)
        raise failure or EngineError(f"the {self.server_name} ended {what} without [DONE]; the "
                                     f"completion may be cut short{self._log_hint()}")

    def _http_error(self, response: httpx2.Response, what: str) -> Exception:
        """The exception for an HTTP error answer (subclasses recognise context overflows)."""
        return EngineError(f"the {self.server_name} answered {what} with HTTP "
                           f"{response.status_code}: {error_message(response)}{self._log_hint()}")

    def _log_hint(self) -> str:
        if self.server is None:
            return ""
        state = "running" if self.server.running else f"exited ({self.server.proc.returncode})"
        return (f". The server process is {state}; its last log lines ({self.server.log_path}):"
                f"\n{self.server.log_tail(15)}")
