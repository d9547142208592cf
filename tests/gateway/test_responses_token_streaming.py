"""``POST /v1/responses`` with ``stream: true``: ``response.output_text.delta`` events leave as
the engine produces tokens (``ResponseStream``), read with OpenAI's SDK over real HTTP.

``GatedEngine`` (``test_token_streaming``) hands out its first token, then waits for the test
before the rest: an event read while it waits was sent before the completion existed (the
old path generated the whole reply first, so these tests time out on it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from areal_agents.client import async_client_for_url
from areal_agents.errors import EngineError, EngineUnavailable
from areal_agents.gateway import Gateway

from .test_token_streaming import ADMIN, GatedEngine, _served, _wait

PREFIX = ["response.created", "response.in_progress", "response.output_item.added",
          "response.content_part.added"]
SUFFIX = ["response.output_text.done", "response.content_part.done",
          "response.output_item.done", "response.completed"]


def _text(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def test_the_first_delta_arrives_before_the_completion_exists(tok):
    ids = tok("hello world again", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    engine = GatedEngine(ids)
    gw, server = _served(tok, engine)
    with server:
        key = await gw.create_session("tiny")
        client = async_client_for_url(server.url, key)
        stream = await client.responses.create(model="tiny", input="hi", stream=True)
        events = aiter(stream)
        head = [await asyncio.wait_for(anext(events), 10) for _ in range(len(PREFIX) + 1)]
        assert [e.type for e in head] == [*PREFIX, "response.output_text.delta"]
        assert not engine.release.is_set()  # the engine has produced one token only
        assert head[-1].delta == tok.decode(ids[:1])
        assert head[0].response.status == "in_progress" and head[0].response.output == []
        assert gw.session(key).turns == []  # nothing recorded mid-stream
        engine.release.set()
        rest = [e async for e in events]
        await client.close()
    every = head + rest
    assert [e.type for e in every][-len(SUFFIX):] == SUFFIX
    assert [e.sequence_number for e in every] == list(range(len(every)))
    assert _text(every) == "hello world again"
    assert sum(1 for e in every if e.type == "response.output_text.delta") >= 2
    item_ids = {e.item_id for e in every if hasattr(e, "item_id")}
    done = every[-1].response
    assert item_ids == {done.output[0].id} and done.output_text == "hello world again"
    assert done.id == head[0].response.id and done.status == "completed"
    assert done.model_extra["token_ids"] == ids
    (turn,) = gw.session(key).turns
    assert turn.request_id == done.id and turn.completion_ids == ids
    assert turn.logprobs == [-0.5 - k for k in range(len(ids))]
    await gw.close()


async def test_half_characters_are_held_back(tok):
    text = "héllo ✓ wörld"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some tokens are partial characters
    engine = GatedEngine(ids)
    engine.release.set()
    gw, server = _served(tok, engine)
    with server:
        client = async_client_for_url(server.url, ADMIN)
        stream = await client.responses.create(model="tiny", input="hi", stream=True)
        events = [e async for e in stream]
        await client.close()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2 and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == events[-1].response.output_text
    await gw.close()


async def test_client_gone_mid_stream_cancels_the_generation_and_records_nothing(tok):
    engine = GatedEngine(tok("a b c", add_special_tokens=False)["input_ids"])
    gw, server = _served(tok, engine)
    with server:
        key = await gw.create_session("tiny")
        client = async_client_for_url(server.url, key)
        stream = await client.responses.create(model="tiny", input="hi", stream=True)
        await asyncio.wait_for(anext(aiter(stream)), 10)
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
        stream = await client.responses.create(model="tiny", input="hi", stream=True)
        seen = []
        with pytest.raises(openai.APIError, match="out of memory"):
            async for event in stream:
                seen.append(event.type)
        await client.close()
    assert seen[:len(PREFIX)] == PREFIX and "response.completed" not in seen
    assert gw.session(key).turns == []
    await gw.close()


@pytest.mark.parametrize(("error", "status"), [
    (EngineUnavailable("replica 0 exited"), 503), (EngineError("bad weights"), 500)])
async def test_failure_before_the_first_token_keeps_its_http_status(tok, error, status):
    gw, server = _served(tok, GatedEngine([5], fail_first=error))
    with server:
        client = async_client_for_url(server.url, ADMIN)
        with pytest.raises(openai.APIStatusError) as info:
            await client.responses.create(model="tiny", input="hi", stream=True)
        await client.close()
    assert info.value.status_code == status and str(error) in info.value.message
    await gw.close()


async def test_local_engine_stream_equals_the_whole_response(tok):
    """A real LocalEngine, sampled with a seed: the streamed deltas concatenate to the
    non-streamed response's text, and the recorded turn holds the same token ids."""
    from areal_agents.engines.local import LocalEngine

    async with LocalEngine("tiny") as engine:
        gw = Gateway(admin_key=ADMIN)
        gw.add_policy("tiny", [engine], tok)
        args = {"model": "tiny", "input": "count", "max_output_tokens": 24,
                "temperature": 1.0, "extra_body": {"seed": 5}}
        whole = await gw.async_client(ADMIN).responses.create(**args)
        key = await gw.create_session("tiny")
        stream = await gw.async_client(key).responses.create(**args, stream=True)
        events = [e async for e in stream]
        await gw.close()
    final = events[-1].response
    assert _text(events) == final.output_text == whole.output_text
    assert sum(1 for e in events if e.type == "response.output_text.delta") >= 2
    assert final.model_extra["token_ids"] == whole.model_extra["token_ids"]
    assert final.status == whole.status and final.usage.output_tokens == whole.usage.output_tokens
    (turn,) = gw.session(key).turns
    assert turn.completion_ids == whole.model_extra["token_ids"] and turn.request_id == final.id
