"""A request cancelled by its caller (an episode cancelled when a trainer stops, a server shutting
down) cancels its generation too: nothing keeps running to fail later on a closed engine with
"Task exception was never retrieved" / "Task was destroyed but it is pending"."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from areal_agents.errors import EngineError
from areal_agents.gateway import Gateway
from areal_agents.testing.engine import ScriptedEngine

MESSAGES = [{"role": "user", "content": "hi"}]


class ClosingEngine(ScriptedEngine):
    """A ScriptedEngine whose requests still waiting when it closes fail, as LocalEngine's do
    ("LocalEngine was closed while the request was pending")."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(["ok"], tokenizer=tokenizer)
        self.closed = False
        self.cancelled = 0

    async def generate(self, request: Any) -> Any:
        try:
            result = await super().generate(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.closed:
            raise EngineError("ClosingEngine was closed while the request was pending")
        return result

    async def close(self) -> None:
        self.closed = True
        await self.resume()  # the waiting requests wake up to the closed engine


async def _start_request(gw: Gateway, engine: ClosingEngine) -> asyncio.Task:
    """A chat request from an in-process client, waiting on the (paused) engine."""
    client = gw.async_client()
    call = asyncio.create_task(client.chat.completions.create(model="p", messages=MESSAGES))
    while engine.num_pending == 0:  # the request reached the engine
        assert not call.done(), call.exception()
        await asyncio.sleep(0)
    return call


async def test_cancelling_the_caller_cancels_the_generation(tok):
    engine = ClosingEngine(tok)
    gw = Gateway(admin_key="k")
    gw.add_policy("p", [engine], tok)
    await engine.pause()
    call = await _start_request(gw, engine)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert (engine.num_pending, engine.cancelled) == (0, 1)  # not left waiting on the engine
    await gw.close()


async def test_closing_after_a_cancelled_request_leaves_no_unretrieved_error(tok):
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        engine = ClosingEngine(tok)
        gw = Gateway(admin_key="k")
        gw.add_policy("p", [engine], tok)
        await engine.pause()
        call = await _start_request(gw, engine)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        del call  # its CancelledError's traceback would keep an orphaned generation alive
        await gw.close()  # an orphaned generation would now fail with GatewayError
        for _ in range(5):  # let any orphan run to its end, then collect it
            await asyncio.sleep(0)
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert [c.get("message") for c in reported] == []
