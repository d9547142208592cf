"""A replica that dies under a request: ``api="completions"`` seats retry the 503 as ``chat``
seats do (the OpenAI SDK retries 5xx on every endpoint), on the in-process path and through
the SDK, and the session records the retried turn once; with every replica dead the request
fails with the gateway's cause after ``max_attempts``."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.engines.base import GenerateRequest, GenerateResult
from areal_agents.errors import EngineUnavailable
from areal_agents.gateway.errors import GatewayError
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.llm_session import open_seat
from areal_agents.trainers.policy import Policy


class _DeadReplica(ScriptedEngine):
    """A replica whose server is gone: every request raises ``EngineUnavailable``."""

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.requests.append(request)
        raise EngineUnavailable("the engine server of this replica is unreachable")


def _gateway(dead: int, live: int) -> tuple[aa.Gateway, list[ScriptedEngine]]:
    _model, tokenizer = aa.models.tiny("xs", seed=0)
    engines = [_DeadReplica(["1"], tokenizer=tokenizer) for _ in range(dead)]
    engines += [ScriptedEngine(["1"], tokenizer=tokenizer) for _ in range(live)]
    gateway = aa.Gateway()
    gateway.add_policy("p", engines, tokenizer)
    return gateway, engines


@pytest.mark.parametrize("path", ["completions-direct", "completions-sdk", "chat"])
async def test_a_request_on_a_dead_replica_is_retried_on_the_live_one(path):
    gateway, (dead, live) = _gateway(dead=1, live=1)
    policy = Policy(api=path.split("-")[0], sampling={"temperature": 1.0, "max_tokens": 1})
    seat = await open_seat(gateway, gateway.async_client(), policy, "p", "a", seed_key="k")
    if path == "completions-sdk":
        seat.agent.direct = None
    reply = await seat.agent.act([{"role": "user", "content": "target: A"}])
    assert reply["content"] == "1"
    assert len(dead.requests) == 1 and len(live.requests) == 1  # tried once, then routed around
    assert dead.requests[0].prompt_ids == live.requests[0].prompt_ids
    assert gateway.policies["p"].router.dead == {0}
    samples = seat.take_samples(reward=1.0, group="0")
    assert len(samples) == 1 and samples[0].loss_mask.count(1) == 1  # the one turn, once
    await gateway.close()


@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_with_every_replica_dead_the_request_fails_with_the_cause(api):
    gateway, (dead,) = _gateway(dead=1, live=0)
    policy = Policy(api=api, sampling={"temperature": 1.0, "max_tokens": 1})
    seat = await open_seat(gateway, gateway.async_client(), policy, "p", "a")
    with pytest.raises(Exception, match="engine replicas of this policy are dead") as info:
        await seat.agent.act([{"role": "user", "content": "target: A"}])
    assert "all 1 engine replicas of this policy are dead" in str(info.value)
    if api == "completions":  # the in-process route's own error
        assert isinstance(info.value, GatewayError) and info.value.status == 503
    assert len(dead.requests) == 1  # later attempts find no live replica to send it to
    seat.close()
    await gateway.close()
