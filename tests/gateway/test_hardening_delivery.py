"""Gateway hardening: tokenisation off the event loop, the body cap, and completions recorded
only once delivered (issue 14)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import openai
import pytest

from areal_agents.client import async_client_for_url
from areal_agents.gateway import Gateway
from areal_agents.gateway.server import ServerThread
from areal_agents.testing.engine import ScriptedEngine

MSGS = [{"role": "user", "content": "hi"}]
SAFETY_S = 30.0  # only ends a wait that would otherwise hang; no assertion depends on it


class BlockingTokenizer:
    """Delegates to ``tok``; rendering a chat template blocks until ``release`` is set (a
    stand-in for an 8 MB message that takes seconds to tokenize)."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.entered, self.release = threading.Event(), threading.Event()
        self.timed_out = False

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        if not self.release.wait(SAFETY_S):
            self.timed_out = True
        return self._tok.apply_chat_template(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tok(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tok)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


async def until(condition, what: str) -> None:
    """Yield to the loop until ``condition()`` holds (bounded by SAFETY_S)."""
    for _ in range(int(SAFETY_S / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def test_health_answers_while_a_prompt_is_tokenized(served, tok):
    blocking = BlockingTokenizer(tok)
    served.gw.policies["tiny"].tokenizer = blocking
    chat = asyncio.ensure_future(served.async_client().chat.completions.create(
        model="tiny", messages=MSGS))
    await until(blocking.entered.is_set, "the tokenizer was entered")
    async with served.http() as http:
        health = await http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert not blocking.release.is_set() and not chat.done()  # still tokenizing meanwhile
    blocking.release.set()
    assert (await chat).choices[0].message.content == "hello world"
    assert not blocking.timed_out


async def test_body_over_the_limit_is_413_naming_the_setting(served):
    served.gw.max_body_bytes = 1000
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 2000}]}
    async with served.http() as http:
        r = await http.post("/v1/chat/completions", json=big)
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large"
        assert "over the gateway's limit of 1000 bytes" in error["message"]
        assert "max_body_bytes" in error["message"] and "--max-body-bytes" in error["message"]

        async def chunks():  # no Content-Length: the cap applies while reading
            for _ in range(3):
                yield b" " * 600

        r = await http.post("/v1/chat/completions", content=chunks())
        assert r.status_code == 413 and "bytes or more, over" in r.json()["error"]["message"]
        small = {"model": "tiny", "messages": MSGS}
        assert (await http.post("/v1/chat/completions", json=small)).status_code == 200


def test_gateway_limits_must_be_positive():
    with pytest.raises(ValueError, match="must be >= 1"):
        Gateway(max_body_bytes=0)


async def test_timed_out_requests_are_abandoned_not_recorded(tok):
    """The SDK times out and retries twice on a paused engine: three abandoned requests, no
    turn (before: three turns the agent never saw, recorded once the engine resumed)."""
    gw = Gateway(admin_key="k")
    engine = ScriptedEngine(["ok"], tokenizer=tok)
    gw.add_policy("tiny", [engine], tok)
    key = await gw.create_session("tiny")
    await gw.pause("tiny")
    with ServerThread(gw.app) as server:
        client = async_client_for_url(server.url, key, timeout=0.3, max_retries=2)
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="tiny", messages=MSGS)
        await client.close()
        assert len(engine.requests) == 3
        await until(lambda: engine.num_pending == 0,
                    "the server cancelled the generations its clients gave up on")
        await gw.resume("tiny")
        client = async_client_for_url(server.url, key)
        r = await client.chat.completions.create(model="tiny", messages=MSGS)
        await client.close()
    assert len(engine.requests) == 4
    session = gw.session(key)
    assert [t.request_id for t in session.turns] == [r.id]  # only the delivered completion
    assert gw.ledger.to_dict() == {"opened": 1, "ended": 0, "abandoned": 3, "expired": 0}


async def test_streamed_completion_is_recorded_once_delivered(served):
    key = await served.gw.create_session("tiny")
    sid = served.gw.session(key).session_id
    stream = await served.async_client(key).chat.completions.create(
        model="tiny", messages=MSGS, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "hello world"
    # recorded before the [DONE] event is written: the client's next step finds it there
    (turn,) = served.gw.session(sid).turns
    assert turn.reply["content"] == "hello world"
    assert served.gw.ledger.abandoned == 0
