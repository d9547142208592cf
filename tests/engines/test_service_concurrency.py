"""``KeepAliveTransport`` (the engine server's hot path) over real loopback sockets, and
``RemoteEngine`` using it against the real server stack (uvicorn + ``build_app``) in process.

The fake servers below are ``asyncio.start_server`` handlers that answer canned bytes, so each
test pins one rule of the subset of HTTP/1.1 the transport speaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import httpcore2
import httpx2
import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.engines.keepalive import KeepAliveTransport
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.remote import RemoteEngine
from areal_agents.engines.service import build_app
from areal_agents.models import tiny

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakeServer:
    """Counts connections and requests; ``answer(request_head, body) -> bytes | None`` (None:
    close the connection without answering)."""

    def __init__(self, answer: Callable[[bytes, bytes], bytes | None]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                out = self.answer(head, body)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _json(status: int, payload: object, extra: str = "") -> bytes:
    body = json.dumps(payload).encode()
    return (f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: "
            f"{len(body)}\r\n{extra}\r\n").encode() + body


@contextlib.asynccontextmanager
async def serve(fake: FakeServer) -> AsyncIterator[str]:
    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        fake.tasks.add(task)
        await fake.handle(reader, writer)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in fake.tasks:  # handlers still reading: end them before the loop closes
            task.cancel()
        for task in fake.tasks:
            with contextlib.suppress(BaseException):
                await task
        for writer in fake.writers:
            writer.close()


def _client(url: str, **kw: object) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(base_url=url, transport=KeepAliveTransport(**kw))


async def test_sequential_requests_reuse_one_connection_and_send_headers_and_body():
    fake = FakeServer(lambda head, body: _json(200, {"echo": json.loads(body)}))
    async with serve(fake) as url, _client(url) as client:
        for i in range(5):
            response = await client.post("/generate?x=1", json={"i": i},
                                         headers={"Authorization": "Bearer t"})
            assert response.status_code == 200 and response.json() == {"echo": {"i": i}}
    assert fake.connections == 1 and len(fake.requests) == 5
    head = fake.requests[0][0].decode()
    assert head.startswith("POST /generate?x=1 HTTP/1.1\r\n")
    assert "\r\nauthorization: Bearer t\r\n" in head
    assert "content-length: 7" in head and "content-type: application/json" in head


async def test_concurrent_requests_each_get_a_connection_then_share_the_idle_ones():
    release = asyncio.Event()
    seen = 0

    async def slow_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        fake.connections += 1
        fake.writers.append(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                seen += 1
                if seen == 4:
                    release.set()
                await release.wait()
                writer.write(_json(200, {"ok": True}))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    fake = FakeServer(lambda head, body: None)
    fake.handle = slow_handle  # type: ignore[method-assign]
    async with serve(fake) as url, _client(url) as client:
        answers = await asyncio.gather(*(client.get("/version") for _ in range(4)))
        assert [a.json() for a in answers] == [{"ok": True}] * 4
        assert fake.connections == 4  # all four were in flight at once
        await asyncio.gather(*(client.get("/version") for _ in range(4)))
        assert fake.connections == 4  # the idle four were reused


async def test_an_idle_connection_the_server_closed_is_replaced_and_the_request_resent():
    def once_then_hang_up(head: bytes, body: bytes) -> bytes | None:
        return _json(200, {"n": len(fake.requests)}) if len(fake.requests) % 2 else None

    fake = FakeServer(once_then_hang_up)  # answers, then closes on the next request
    async with serve(fake) as url, _client(url) as client:
        assert (await client.get("/a")).json() == {"n": 1}
        assert (await client.get("/b")).json() == {"n": 3}  # /b was sent twice
    assert fake.connections == 2
    assert [h.split(b" ")[1] for h, _ in fake.requests] == [b"/a", b"/b", b"/b"]


async def test_a_fresh_connection_closed_without_an_answer_is_a_read_error_not_a_retry():
    fake = FakeServer(lambda head, body: None)
    async with serve(fake) as url, _client(url) as client:
        with pytest.raises(httpx2.RemoteProtocolError,
                           match="the server closed the connection without answering"):
            await client.get("/a")
    assert len(fake.requests) == 1


async def test_connection_close_and_http_1_0_answers_retire_their_connection():
    answers = iter([_json(200, {"a": 1}, "connection: close\r\n"),
                    b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}",
                    _json(200, {"c": 3})])
    fake = FakeServer(lambda head, body: next(answers))
    async with serve(fake) as url, _client(url) as client:
        assert [(await client.get("/")).json() for _ in range(3)] == [{"a": 1}, {}, {"c": 3}]
    assert fake.connections == 3


async def test_chunked_and_error_answers_come_back_whole():
    chunked = (b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n"
               b"5\r\n{\"e\":\r\n4;ext=1\r\n \"x\"\r\n1\r\n}\r\n0\r\n\r\n")
    fake = FakeServer(lambda head, body: chunked)
    async with serve(fake) as url, _client(url) as client:
        response = await client.get("/")
        assert response.status_code == 400 and response.json() == {"e": "x"}
        assert (await client.get("/")).json() == {"e": "x"}
    assert fake.connections == 1


async def test_no_answer_in_time_is_a_read_timeout_and_the_connection_is_not_reused():
    hang = asyncio.Event()

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fake.connections += 1
        fake.writers.append(writer)
        await hang.wait()

    fake = FakeServer(lambda head, body: None)
    fake.handle = never  # type: ignore[method-assign]
    async with serve(fake) as url, _client(url) as client:
        with pytest.raises(httpx2.ReadTimeout, match=r"no answer within 0\.2 s"):
            await client.get("/", timeout=0.2)
        with pytest.raises(httpx2.ReadTimeout):
            await client.get("/", timeout=0.2)
        assert fake.connections == 2
        hang.set()


async def test_a_cancelled_request_does_not_leave_its_connection_for_the_next():
    gate = asyncio.Event()

    def answer(head: bytes, body: bytes) -> bytes:
        return _json(200, {"path": head.split(b" ")[1].decode()})

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fake.connections += 1
        fake.writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /slow"):
                    await gate.wait()
                writer.write(answer(head, b""))
                await writer.drain()

    fake = FakeServer(answer)
    fake.handle = gated  # type: ignore[method-assign]
    async with serve(fake) as url, _client(url) as client:
        task = asyncio.create_task(client.get("/slow"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()  # the late answer to /slow must not be read as the answer to /next
        assert (await client.get("/next")).json() == {"path": "/next"}
    assert fake.connections == 2


async def test_a_refused_connection_is_a_connect_error():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with _client(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(httpx2.ConnectError):
            await client.get("/")


async def test_not_http_is_a_protocol_error():
    fake = FakeServer(lambda head, body: b"SSH-2.0-OpenSSH\r\n\r\n")
    async with serve(fake) as url, _client(url) as client:
        with pytest.raises(httpx2.RemoteProtocolError, match=r"not an HTTP/1\.x answer: b.SSH-2\.0"):
            await client.get("/")


# ---- RemoteEngine against the real server stack ----------------------------------------------


@pytest.fixture
async def real_server() -> AsyncIterator[tuple[LocalEngine, str]]:
    """A LocalEngine behind ``build_app`` served by uvicorn on a free loopback port."""
    import uvicorn

    torch.set_num_threads(1)
    model, tok = tiny("xs", seed=0)
    engine = LocalEngine(model, tok, max_batch_size=8, prefix_cache_tokens=0)
    config = uvicorn.Config(build_app(engine, "tok"), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="off", timeout_keep_alive=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield engine, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task
    await engine.close()


async def test_remote_engine_requests_skip_httpcore_and_match_the_local_engine(
        real_server, monkeypatch):
    """The hot path: httpx2's default pool cost ~2.5 ms of the trainer's CPU per request on
    2 cores (benchmarks/async_vs_sync.py); RemoteEngine's own transport never enters it."""
    engine, url = real_server

    async def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("RemoteEngine went through httpcore's connection pool")

    monkeypatch.setattr(httpcore2.AsyncConnectionPool, "handle_async_request", refuse)
    remote = await RemoteEngine.attach(url, token="tok")
    try:
        requests = [GenerateRequest([5, 6, 7 + i], SamplingParams(max_tokens=3, temperature=0.0))
                    for i in range(6)]
        remote_out = await asyncio.gather(*(remote.generate(r) for r in requests))
        local_out = [await engine.generate(r) for r in requests]
        for got, want in zip(remote_out, local_out, strict=True):
            assert got.outputs[0].token_ids == want.outputs[0].token_ids
            assert got.outputs[0].logprobs == pytest.approx(want.outputs[0].logprobs, abs=1e-6)
        await asyncio.sleep(1.5)  # uvicorn closes the idle keep-alive connections (1 s)
        again = await remote.generate(requests[0])  # on a fresh connection, transparently
        assert again.outputs[0].token_ids == local_out[0].outputs[0].token_ids
    finally:
        await remote.close()
