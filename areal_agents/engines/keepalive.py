"""``KeepAliveTransport``: a lean HTTP/1.1 ``httpx2`` transport for engine servers on loopback.

``RemoteEngine`` sends one small JSON request per generation to its engine server. Through
``httpx2``'s default transport (``httpcore`` + ``anyio``) a request cost about 2.5 ms of the
caller's CPU on this project's 2-core machine (most of it the connection pool checking every
idle connection with a syscall and anyio's per-call bookkeeping), against about 0.3 ms for a
plain ``asyncio`` stream exchange. In an RL trainer that CPU is taken from the same process,
and the same GIL, as training: the rollouts an async run overlaps with training cost training
time instead. This transport speaks the subset of HTTP/1.1 the engine server answers with:

* one request per connection at a time; idle connections are kept per ``(host, port)`` and
  reused (``Connection: close`` in an answer retires its connection);
* ``Content-Length`` or ``chunked`` bodies, read whole (no streaming);
* a reused connection that the server closed while idle (a failed write, or EOF before any
  answer byte) is dropped and the request re-sent on the next idle or a fresh connection, as
  ``httpcore`` does;
* errors are ``httpx2``'s: ``ConnectError`` (no connection), ``ReadTimeout`` (no whole answer
  within the request's read timeout, else ``timeout_s``), ``ReadError`` (the connection broke),
  ``RemoteProtocolError`` (not HTTP/1.x), so callers map them as for the default transport.

``https`` URLs go to ``httpx2``'s default transport unchanged. ``aclose`` closes the idle
connections; the transport stays usable (``RemoteEngine`` keeps one across server restarts).

Example:
    >>> import httpx2
    >>> client = httpx2.AsyncClient(transport=KeepAliveTransport())
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx2

__all__ = ["KeepAliveTransport"]

_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_MAX_HEADER_LINES = 100


class KeepAliveTransport(httpx2.AsyncBaseTransport):
    """Plain-HTTP/1.1 keep-alive transport (see the module docstring for what it speaks).

    Args:
        timeout_s: the read timeout when a request carries none.
        max_idle: idle connections kept per ``(host, port)``; more are closed.
    """

    def __init__(self, *, timeout_s: float = 600.0, max_idle: int = 64) -> None:
        self.timeout_s = timeout_s
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._fallback: httpx2.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        if url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx2.AsyncHTTPTransport()
            return await self._fallback.handle_async_request(request)
        key = (url.host, url.port or 80)
        body = await request.aread()
        head = _request_head(request, len(body))
        timeout = (request.extensions.get("timeout") or {}).get("read") or self.timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange(key, head + body, request)
        except TimeoutError as exc:
            raise httpx2.ReadTimeout(f"no answer within {timeout} s", request=request) from exc

    async def _exchange(self, key: tuple[str, int], data: bytes,
                        request: httpx2.Request) -> httpx2.Response:
        while True:
            reused = bool(self._idle.get(key))
            connection = self._idle[key].pop() if reused else await _connect(key, request)
            reader, writer = connection
            keep = False
            try:
                try:
                    writer.write(data)
                    await writer.drain()
                    status_line = await reader.readline()
                except OSError:
                    if reused:  # closed while idle: retry on another (or a fresh) connection
                        continue
                    raise
                if not status_line:
                    if reused:
                        continue
                    raise httpx2.RemoteProtocolError(
                        "the server closed the connection without answering", request=request)
                status, headers, content, keep = await _read_answer(status_line, reader,
                                                                    request)
                return httpx2.Response(status, headers=headers, content=content,
                                       request=request)
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise httpx2.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc
            finally:  # a cancelled or failed exchange leaves the connection in no known state
                if keep and len(self._idle.setdefault(key, [])) < self.max_idle:
                    self._idle[key].append(connection)
                else:
                    writer.close()

    async def aclose(self) -> None:
        """Close the idle connections (the transport stays usable)."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _, writer in connections:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        if self._fallback is not None:
            await self._fallback.aclose()
            self._fallback = None


async def _connect(key: tuple[str, int], request: httpx2.Request) -> _Connection:
    try:
        return await asyncio.open_connection(*key)
    except OSError as exc:
        raise httpx2.ConnectError(f"{type(exc).__name__}: {exc}", request=request) from exc


def _request_head(request: httpx2.Request, length: int) -> bytes:
    lines = [f"{request.method} {request.url.raw_path.decode('ascii')} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in request.headers.multi_items()
              if k.lower() not in ("content-length", "transfer-encoding", "connection")]
    lines += [f"content-length: {length}", "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def _read_answer(status_line: bytes, reader: asyncio.StreamReader,
                       request: httpx2.Request) -> tuple[int, list[tuple[str, str]], bytes, bool]:
    """(status, headers, body, whether the connection may be reused) of one answer."""
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx2.RemoteProtocolError(f"not an HTTP/1.x answer: {status_line[:80]!r}",
                                         request=request)
    headers: list[tuple[str, str]] = []
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    else:
        raise httpx2.RemoteProtocolError("too many header lines", request=request)
    fields = dict(headers)
    if fields.get("transfer-encoding", "").lower() == "chunked":
        content = await _read_chunked(reader)
    elif "content-length" in fields:
        content = await reader.readexactly(int(fields["content-length"]))
    else:  # the body runs to the end of the connection
        content = await reader.read()
        return int(parts[1]), headers, content, False
    keep = fields.get("connection", "").lower() != "close" and parts[0] != b"HTTP/1.0"
    headers = [(k, v) for k, v in headers if k != "transfer-encoding"]
    return int(parts[1]), headers, content, keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)  # the chunk's CRLF
