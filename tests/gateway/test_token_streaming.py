"""Token streaming: SSE chunks leave the gateway as the engine produces tokens.

``GatedEngine`` hands out its first token, then waits for the test (a ``threading.Event``:
the uvicorn server runs in its own thread and loop) before the rest: a chunk read while it
waits can only have been sent before the completion existed.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import openai
import pytest

from areal_agents.client import async_client_for_url
from areal_agents.engines.base import (
    CompletionOutput,
    GenerateRequest,
    GenerateResult,
    InferenceEngine,
    OnTokens,
    SamplingParams,
    TokenDelta,
)
from areal_agents.errors import EngineError, EngineUnavailable
from areal_agents.gateway import Gateway
from areal_agents.gateway.server import ServerThread
from areal_agents.gateway.streaming import TextStream
from areal_agents.testing.engine import ScriptedEngine

ADMIN = "admin-test-key"
MSGS = [{"role": "user", "content": "hi"}]


class GatedEngine(InferenceEngine):
    """Streams ``ids`` one token a delta; after the first, waits for ``release`` (or fails
    with ``fail_after_first``). ``cancelled`` is set when its generation was cancelled."""

    def __init__(self, ids: list[int], fail_after_first: Exception | None = None,
                 fail_first: Exception | None = None) -> None:
        self.ids, self.fail_after_first, self.fail_first = ids, fail_after_first, fail_first
        self.release, self.first_sent = threading.Event(), threading.Event()
        self.cancelled = threading.Event()

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self.generate_streaming(request, lambda delta: None)

    async def generate_streaming(self, request: GenerateRequest,
                                 on_tokens: OnTokens) -> GenerateResult:
        if self.fail_first is not None:
            raise self.fail_first
        lps = [-0.5 - k for k in range(len(self.ids))]
        try:
            for k, tok in enumerate(self.ids):
                on_tokens(TokenDelta(0, [tok], [lps[k]], [0]))
                if k == 0:
                    self.first_sent.set()
                    if self.fail_after_first is not None:
                        raise self.fail_after_first
                    while not self.release.is_set():
                        await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        out = CompletionOutput(list(self.ids), lps, [0] * len(self.ids), "stop")
        return GenerateResult(request.request_id, list(request.prompt_ids), [out])

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


@pytest.fixture(scope="module")
def tok() -> Any:
    from areal_agents.models import tiny_tokenizer

    return tiny_tokenizer()


def _served(tok: Any, engine: InferenceEngine) -> tuple[Gateway, ServerThread]:
    gw = Gateway(admin_key=ADMIN)
    gw.add_policy("tiny", [engine], tok)
    return gw, ServerThread(gw.app)


async def _wait(event: threading.Event, what: str) -> None:
    for _ in range(1000):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_first_chunk_arrives_before_the_completion_exists(tok):
    ids = tok("hello world again", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    engine = GatedEngine(ids)
    gw, server = _served(tok, engine)
    with server:
        key = await gw.create_session("tiny")
        client = async_client_for_url(server.url, key)
        stream = await client.chat.completions.create(model="tiny", messages=MSGS, stream=True,
                                                      logprobs=True)
        chunks = aiter(stream)
        role = await asyncio.wait_for(anext(chunks), 10)
        first = await asyncio.wait_for(anext(chunks), 10)
        assert role.choices[0].delta.role == "assistant"
        assert not engine.release.is_set()  # the engine has produced one token only
        assert first.choices[0].delta.content == tok.decode(ids[:1])
        assert first.choices[0].logprobs.content[0].logprob == -0.5
        assert gw.session(key).turns == []  # nothing recorded mid-stream
        engine.release.set()
        rest = [c async for c in chunks]
        await client.close()
    text = first.choices[0].delta.content + "".join(
        c.choices[0].delta.content or "" for c in rest if c.choices)
    assert text == "hello world again"
    final = next(c for c in rest if c.choices and c.choices[0].finish_reason)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].model_extra["token_ids"] == ids
    (turn,) = gw.session(key).turns
    assert turn.completion_ids == ids and turn.reply["content"] == "hello world again"
    assert turn.logprobs == [-0.5 - k for k in range(len(ids))]
    await gw.close()


async def test_client_gone_mid_stream_cancels_the_generation_and_records_nothing(tok):
    engine = GatedEngine(tok("a b c", add_special_tokens=False)["input_ids"])
    gw, server = _served(tok, engine)
    with server:
        key = await gw.create_session("tiny")
        client = async_client_for_url(server.url, key)
        stream = await client.chat.completions.create(model="tiny", messages=MSGS, stream=True)
        chunks = aiter(stream)
        await asyncio.wait_for(anext(chunks), 10)
        await stream.close()  # the client goes away with the engine mid-completion
        await _wait(engine.cancelled, "the generation to be cancelled")
        await client.close()
    assert gw.session(key).turns == []
    assert gw.ledger.abandoned == 1
    await gw.close()


async def test_engine_failure_mid_stream_is_an_error_event_and_nothing_is_recorded(tok):
    engine = GatedEngine(tok("a b c", add_special_tokens=False)["input_ids"],
                         fail_after_first=EngineError("forward pass failed: out of memory"))
    gw, server = _served(tok, engine)
    with server:
        key = await gw.create_session("tiny")
        client = async_client_for_url(server.url, key)
        stream = await client.chat.completions.create(model="tiny", messages=MSGS, stream=True)
        with pytest.raises(openai.APIError, match="out of memory"):
            async for _ in stream:
                pass
        await client.close()
    assert gw.session(key).turns == []
    await gw.close()


@pytest.mark.parametrize(("error", "status"), [
    (EngineUnavailable("replica 0 exited"), 503), (EngineError("bad weights"), 500)])
async def test_failure_before_the_first_token_keeps_its_http_status(tok, error, status):
    gw, server = _served(tok, GatedEngine([5], fail_first=error))
    with server:
        key = await gw.create_session("tiny")
        client = async_client_for_url(server.url, key)
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="tiny", messages=MSGS, stream=True)
        await client.close()
    assert info.value.status_code == status
    assert str(error) in info.value.message
    await gw.close()


async def test_a_context_overflow_is_a_400_before_any_chunk(tok):
    gw, server = _served(tok, GatedEngine([5]))
    with server:
        client = async_client_for_url(server.url, ADMIN)
        with pytest.raises(openai.BadRequestError, match="context"):
            await client.chat.completions.create(model="tiny", messages=MSGS, stream=True,
                                                 max_tokens=10**6)
        await client.close()
    await gw.close()


async def test_local_engine_stream_equals_the_whole_answer(tok):
    """A real LocalEngine, sampled with a seed, n=2, a stop string and log-probs: the streamed
    deltas of each choice concatenate to the non-streamed content, arriving in several
    chunks, and the recorded turns carry the same token ids."""
    from areal_agents.engines.local import LocalEngine

    async with LocalEngine("tiny") as engine:
        gw = Gateway(admin_key=ADMIN)
        gw.add_policy("tiny", [engine], tok, max_n=2)
        client = gw.async_client(ADMIN)
        args = {"model": "tiny", "messages": MSGS, "max_tokens": 24, "temperature": 1.0,
                "seed": 7, "n": 2, "stop": ["e "], "logprobs": True}
        whole = await client.chat.completions.create(**args)
        key = await gw.create_session("tiny")
        stream = await gw.async_client(key).chat.completions.create(
            **args, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        await gw.close()
    for choice in whole.choices:
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        text = "".join(p.delta.content or "" for p in parts)
        assert text == choice.message.content
        assert sum(1 for p in parts if p.delta.content) >= 2  # streamed, not one block
        streamed_lps = [e.logprob for p in parts if p.logprobs for e in p.logprobs.content]
        assert streamed_lps == [e.logprob for e in choice.logprobs.content]
        assert parts[-1].finish_reason == choice.finish_reason
        assert parts[-1].model_extra["token_ids"] == choice.model_extra["token_ids"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    turns = gw.session(key).turns
    assert [t.completion_ids for t in turns] == [c.model_extra["token_ids"]
                                                 for c in whole.choices]


async def test_local_engine_streams_each_decode_step(tok):
    from areal_agents.engines.local import LocalEngine

    async with LocalEngine("tiny") as engine:
        request = GenerateRequest([1, 20, 30], SamplingParams(max_tokens=16, temperature=1.0,
                                                              seed=3, n=2, top_logprobs=2))
        deltas: list[tuple[int, TokenDelta]] = []
        result = await engine.generate_streaming(
            request, lambda d: deltas.append((engine.num_pending, d)))
        again = await engine.generate(GenerateRequest([1, 20, 30], request.sampling))
    for i, out in enumerate(result.outputs):
        mine = [d for _, d in deltas if d.index == i]
        assert [t for d in mine for t in d.token_ids] == out.token_ids == again.outputs[i].token_ids
        assert [x for d in mine for x in d.logprobs] == out.logprobs
        assert [x for d in mine for x in (d.top_logprobs or [])] == out.top_logprobs
        assert len(mine) >= len(out.token_ids) - 1  # one step a delta (the first has two)
    assert deltas[0][0] == 1  # the first tokens left while the request was still pending


async def test_engines_without_streaming_deliver_one_delta_per_completion(tok):
    engine = ScriptedEngine([[5, 6, 7], [8, 9]])
    deltas: list[TokenDelta] = []
    result = await engine.generate_streaming(
        GenerateRequest([1], SamplingParams(max_tokens=8, n=2)), deltas.append)
    assert [(d.index, d.token_ids) for d in deltas] == [(0, [5, 6, 7]), (1, [8, 9])]
    assert [d.logprobs for d in deltas] == [o.logprobs for o in result.outputs]


def test_text_stream_holds_back_a_possible_stop_string(tok):
    ids = tok("one two three", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, ["two"], set())
    sent = "".join(stream.push([t]) for t in ids)
    # "two" cut the text; nothing at or after it was ever released
    assert "two" not in sent and "t" not in sent.removeprefix("one ")
    final = "one "
    assert sent + stream.finish(final) == final


def test_text_stream_never_releases_half_a_character(tok):
    text = "héllo ✓ wörld"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, [], set())
    pieces = [stream.push([t]) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.finish(text) == text
