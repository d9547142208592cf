"""``RemoteEngine.generate_streaming`` against a real engine-server process (slow: the start
loads torch): tokens leave the server per decode step, exactly ``generate``'s result at the end.

One server serves the module; the last test launches (and kills) its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import httpx2
import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.engines.base import TokenDelta
from areal_agents.engines.remote import RemoteEngine
from areal_agents.errors import ContextLengthExceeded, EngineUnavailable
from areal_agents.models import tiny

pytestmark = pytest.mark.slow

ADMIN = "admin-test-key"
LONG = 400  # tokens of the "long" requests: many decode steps after the first delta


@pytest.fixture(scope="module")
def remote(model_dir: Path, loop: Any) -> Any:
    torch.set_num_threads(1)
    engine = loop.run_until_complete(RemoteEngine.launch(model_dir, max_batch_size=8))
    yield engine
    loop.run_until_complete(engine.close())


def _req(prompt: list[int], **kw: Any) -> GenerateRequest:
    return GenerateRequest(list(prompt), SamplingParams(**kw))


def _prompt() -> list[int]:
    return tiny("xs", seed=0)[1].encode("12 + 30 = ? Answer:")


async def _server_pending(remote: RemoteEngine) -> int:
    return int((await remote._request("GET", "/version"))["num_pending"])


async def _first_delta_then(remote: RemoteEngine, request: GenerateRequest
                            ) -> tuple[asyncio.Task, list[TokenDelta]]:
    """Start streaming ``request``; return (its task, the deltas so far) once one arrived."""
    deltas: list[TokenDelta] = []
    first = asyncio.Event()

    def on_tokens(delta: TokenDelta) -> None:
        deltas.append(delta)
        first.set()

    task = asyncio.ensure_future(remote.generate_streaming(request, on_tokens))
    await asyncio.wait_for(first.wait(), 60)
    return task, deltas


def test_the_first_delta_arrives_while_the_server_is_still_generating(remote, loop):
    """Paused right after the first delta, the server still holds the request with most of
    its tokens to come (the old one-delta-at-the-end path delivered the first delta only
    once the server had finished: nothing pending, every token received)."""
    request = _req(_prompt(), max_tokens=LONG, temperature=1.0, seed=1)

    async def scenario() -> tuple[int, int, Any, list[TokenDelta]]:
        task, deltas = await _first_delta_then(remote, request)
        await remote.pause()
        try:
            pending = await _server_pending(remote)
            received = sum(len(d.token_ids) for d in deltas)
        finally:
            await remote.resume()
        return pending, received, await task, deltas

    pending, received, result, deltas = loop.run_until_complete(scenario())
    out = result.outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == LONG
    assert pending == 1 and received < LONG // 2
    assert [t for d in deltas for t in d.token_ids] == out.token_ids
    assert len(deltas) >= LONG - 1  # one delta per decode step (the first may carry two)
    assert remote.num_pending == 0


@pytest.mark.parametrize("sampling", [
    {"max_tokens": 32, "temperature": 0.0, "top_logprobs": 2},
    {"max_tokens": 24, "temperature": 1.0, "seed": 7, "n": 2, "top_logprobs": 3},
], ids=["greedy", "seeded-n2"])
def test_deltas_concatenate_to_the_result_and_it_equals_generate(remote, loop, sampling):
    request = _req(_prompt(), **sampling)
    deltas: list[TokenDelta] = []

    async def both() -> tuple[Any, Any]:
        streamed = await remote.generate_streaming(request, deltas.append)
        return streamed, await remote.generate(request)

    streamed, whole = loop.run_until_complete(both())
    assert streamed.outputs == whole.outputs  # ids, log-probs, versions, top, finish reason
    assert streamed.request_id == request.request_id and streamed.prompt_ids == request.prompt_ids
    for i, out in enumerate(streamed.outputs):
        mine = [d for d in deltas if d.index == i]
        assert [t for d in mine for t in d.token_ids] == out.token_ids
        assert [x for d in mine for x in d.logprobs] == out.logprobs
        assert [v for d in mine for v in d.versions] == out.versions == [0] * len(out.token_ids)
        assert [r for d in mine for r in d.top_logprobs or []] == out.top_logprobs
        assert all(isinstance(pair, tuple) for row in out.top_logprobs for pair in row)
        assert len(mine) >= len(out.token_ids) - 1


def test_cancelling_the_caller_cancels_the_generation_on_the_server(remote, loop):
    """Cancelled while the server is paused (so it cannot have finished by itself): the server
    sees the disconnect, cancels the generation, and nothing is pending once it resumes."""
    request = _req(_prompt(), max_tokens=3000, temperature=1.0, seed=2)
    log_line = f"request {request.request_id}: the client disconnected mid-stream"

    async def scenario() -> tuple[int, int]:
        task, _ = await _first_delta_then(remote, request)
        await remote.pause()
        try:
            held = await _server_pending(remote)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if log_line in remote.server.log_tail(50):
                    break
                await asyncio.sleep(0.05)
        finally:
            await remote.resume()
        for _ in range(200):
            if await _server_pending(remote) == 0:
                break
            await asyncio.sleep(0.05)
        return held, await _server_pending(remote)

    held, after = loop.run_until_complete(scenario())
    assert held == 1 and after == 0 and remote.num_pending == 0
    assert log_line in remote.server.log_tail(50)


async def _until(check: Any, polls: int = 200) -> None:
    """Poll the coroutine function ``check`` (every 50 ms) until it returns True."""
    for _ in range(polls):
        if await check():
            return
        await asyncio.sleep(0.05)


def test_a_caller_gone_before_the_first_token_cancels_the_queued_generation(remote, loop):
    """Sent while the server is paused (no token can exist), then cancelled: the server
    watches for the disconnect before its answer starts and drops the queued request."""
    request = _req(_prompt(), max_tokens=50, temperature=0.0)
    log_line = f"request {request.request_id}: the client disconnected before its first token"

    async def scenario() -> tuple[int, bool, int]:
        await remote.pause()
        try:
            task = asyncio.ensure_future(remote.generate_streaming(request, lambda d: None))

            async def queued() -> bool:
                return await _server_pending(remote) == 1

            await _until(queued)
            held = await _server_pending(remote)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            async def logged() -> bool:
                return log_line in remote.server.log_tail(50)

            await _until(logged)
            seen = await logged()
        finally:
            await remote.resume()

        async def idle() -> bool:
            return await _server_pending(remote) == 0

        await _until(idle)
        return held, seen, await _server_pending(remote)

    assert loop.run_until_complete(scenario()) == (1, True, 0)
    assert remote.num_pending == 0


def test_errors_before_the_first_token_are_generates_answers(remote, loop):
    async def scenario() -> list[tuple[int, Any]]:
        answers = []
        async with httpx2.AsyncClient(base_url=remote.url) as http:
            auth = {"Authorization": f"Bearer {remote.token}"}
            for body, headers in [({"prompt_ids": [1, 2]}, {}),
                                  ({"prompt_ids": "12"}, auth),
                                  ({"prompt_ids": [1] * 4000, "sampling": {"max_tokens": 200}},
                                   auth)]:
                answer = await http.post("/generate/stream", json=body, headers=headers)
                answers.append((answer.status_code, answer.json()["error"]["type"]))
        return answers

    assert loop.run_until_complete(scenario()) == [
        (401, "unauthorized"), (400, "invalid_request"), (400, "context_length_exceeded")]
    max_context, remote.max_context = remote.max_context, 10**6  # skip the client's own check
    try:
        with pytest.raises(ContextLengthExceeded, match="exceeds the context window"):
            loop.run_until_complete(remote.generate_streaming(
                _req([1] * 4000, max_tokens=200), lambda d: None))
    finally:
        remote.max_context = max_context
    assert remote.num_pending == 0


def test_a_gateway_stream_over_a_remote_engine_sends_a_chunk_per_decode_step(remote, loop):
    """The gateway's streamed chat completion through the engine server: one content chunk
    per decode step (the old path gave the whole answer as one chunk), concatenating to the
    non-streamed answer, and the recorded turn has its exact ids."""
    from areal_agents.gateway import Gateway

    tok = tiny("xs", seed=0)[1]
    args = {"model": "tiny", "messages": [{"role": "user", "content": "12 + 30 = ?"}],
            "max_tokens": 24, "temperature": 0.0, "logprobs": True}

    async def scenario() -> tuple[Any, list[Any], Any]:
        # a second client of the module's server: closing the gateway closes only it
        engine = await RemoteEngine.attach(remote.url, token=remote.token)
        gw = Gateway(admin_key=ADMIN)
        gw.add_policy("tiny", [engine], tok)
        try:
            whole = await gw.async_client(ADMIN).chat.completions.create(**args)
            key = await gw.create_session("tiny")
            stream = await gw.async_client(key).chat.completions.create(**args, stream=True)
            chunks = [c async for c in stream]
            return whole, chunks, gw.session(key).turns
        finally:
            await gw.close()

    whole, chunks, turns = loop.run_until_complete(scenario())
    ids = whole.choices[0].model_extra["token_ids"]
    parts = [c.choices[0] for c in chunks if c.choices]
    with_tokens = [p for p in parts if p.logprobs and p.logprobs.content]
    assert len(ids) == 24 and len(with_tokens) >= len(ids) - 1
    assert [e.logprob for p in with_tokens for e in p.logprobs.content] == [
        e.logprob for e in whole.choices[0].logprobs.content]
    assert "".join(p.delta.content or "" for p in parts) == whole.choices[0].message.content
    assert parts[-1].model_extra["token_ids"] == ids
    assert [t.completion_ids for t in turns] == [ids]


def test_a_server_killed_mid_stream_is_unavailable_and_a_restarted_one_streams(model_dir, loop):
    """Its own server (restartable): killed after the first delta, the stream raises what
    ``generate`` raises for a dead server; after ``restart`` (a new port and token) streaming
    reaches the new server."""
    request = _req(_prompt(), max_tokens=16, temperature=0.0)

    async def scenario() -> tuple[str, str, Any, Any]:
        engine = await RemoteEngine.launch(model_dir, restart_limit=1)
        try:
            task, _ = await _first_delta_then(engine, _req(_prompt(), max_tokens=3000,
                                                           temperature=1.0, seed=3))
            old_url = engine.url
            os.killpg(engine.server.pid, signal.SIGKILL)
            with pytest.raises(EngineUnavailable, match=r"The server process is exited \(-9\)"):
                await task
            assert not engine.alive and engine.num_pending == 0
            await engine.restart()
            deltas: list[TokenDelta] = []
            streamed = await engine.generate_streaming(request, deltas.append)
            assert [t for d in deltas for t in d.token_ids] == streamed.outputs[0].token_ids
            return old_url, engine.url, streamed, await engine.generate(request)
        finally:
            await engine.close()

    old_url, new_url, streamed, whole = loop.run_until_complete(scenario())
    assert new_url != old_url and streamed.outputs == whole.outputs
