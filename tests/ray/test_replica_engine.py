"""``RayReplicaEngine`` without Ray: a replica whose server never answers (a lost node keeps no
connection alive, and closes none) fails its calls as soon as its actor's watch ends, instead
of after ``timeout_s``."""

from __future__ import annotations

import asyncio

import httpx2
import pytest

from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.errors import EngineUnavailable
from areal_agents.trainers.ray_replicas import RayReplicaEngine


class _Silent(httpx2.AsyncBaseTransport):
    """A server that takes every request and never answers (a frozen or vanished node)."""

    def __init__(self) -> None:
        self.received: list[str] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.received.append(request.url.path)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class _ActorDied(Exception):
    """Stands in for ``ray.exceptions.RayActorError``."""


def _engine(transport: httpx2.AsyncBaseTransport) -> RayReplicaEngine:
    return RayReplicaEngine("http://10.0.0.9:8000", token="t", max_context=64, timeout_s=600,
                            http_transport=transport)


async def test_calls_in_flight_and_later_fail_once_the_actor_is_reported_dead():
    silent = _Silent()
    engine = _engine(silent)
    watch = asyncio.get_running_loop().create_future()  # the actor's never-ending watch
    engine.watch(watch)
    request = GenerateRequest([1, 2, 3], SamplingParams(max_tokens=2))
    generating = asyncio.ensure_future(engine.generate(request))
    pausing = asyncio.ensure_future(engine.pause())
    await asyncio.sleep(0.05)
    assert silent.received == ["/generate", "/pause"] and engine.num_pending == 1
    assert not generating.done() and not pausing.done()  # still waiting (timeout_s is 600)
    watch.set_exception(_ActorDied("the actor died"))
    for call in (generating, pausing):
        with pytest.raises(EngineUnavailable, match=r"the engine server at http://10.0.0.9:8000 "
                           r"is lost: its Ray actor died \(_ActorDied\)"):
            await asyncio.wait_for(call, 5)
    assert engine.num_pending == 0  # the router's and the scaler's counts are released
    with pytest.raises(EngineUnavailable, match="POST /resume was not answered"):
        await asyncio.wait_for(engine.resume(), 5)  # later calls fail at once
    assert silent.received == ["/generate", "/pause"]  # not even sent
    await engine.close()


async def test_an_unwatched_or_live_engine_answers_as_a_remote_engine():
    answered = httpx2.MockTransport(lambda request: httpx2.Response(200, json={"ok": True}))
    engine = _engine(answered)
    assert await engine._request("POST", "/pause") == {"ok": True}  # no watch yet
    watch = asyncio.get_running_loop().create_future()
    engine.watch(watch)
    assert await engine._request("POST", "/resume") == {"ok": True}  # the actor lives
    await engine.close()
    await asyncio.sleep(0)
    assert engine.actor_lost is not None and engine.actor_lost.cancelled()  # watch stopped
