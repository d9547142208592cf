"""In-process completions seats skip HTTP and the OpenAI SDK (``complete_in_process``) and
record the same exact-token samples as the HTTP route."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.gateway.errors import GatewayError
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.llm_session import SessionAgent, complete_in_process, open_seat
from areal_agents.trainers.policy import Policy

SAMPLING = {"temperature": 1.0, "max_tokens": 2, "stop": ["\n"], "extra_body": {"top_k": 5}}


class NoClient:
    """Fails any use: proves a seat never touched its SDK client."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the SDK client was used ({name})")


async def _two_turns(agent: SessionAgent) -> None:
    agent.reset()
    await agent.act([{"role": "user", "content": "target: A"}])
    await agent.act([{"role": "user", "content": "again: B"}])


@pytest.fixture
def served():
    _model, tokenizer = aa.models.tiny("xs", seed=0)
    engine = ScriptedEngine(["1", "2"] * 2, tokenizer=tokenizer)
    gateway = aa.Gateway()
    gateway.add_policy("p", [engine], tokenizer)
    return gateway, engine


async def test_direct_seat_records_what_the_http_route_records(served):
    gateway, engine = served
    policy = Policy(api="completions", sampling=dict(SAMPLING))
    direct = await open_seat(gateway, gateway.async_client(), policy, "p", "a", seed_key="k")
    assert direct.agent.direct is not None
    direct.agent.client = NoClient()  # every turn must take the direct path
    await _two_turns(direct.agent)
    http = await open_seat(gateway, gateway.async_client(), policy, "p", "a", seed_key="k")
    http.agent.direct = None  # the same seat through the SDK and the ASGI route
    await _two_turns(http.agent)

    first, second = engine.requests[:2], engine.requests[2:]
    assert [(r.prompt_ids, r.sampling) for r in first] == [(r.prompt_ids, r.sampling)
                                                           for r in second]
    assert first[0].sampling.top_k == 5 and first[0].sampling.max_tokens == 2  # extra_body
    assert direct.agent.history == http.agent.history
    ours, theirs = (s.take_samples(reward=1.0, group="7") for s in (direct, http))
    assert len(ours) == len(theirs) == 1
    for a, b in zip(ours, theirs, strict=True):
        assert (a.token_ids, a.loss_mask, a.logprobs, a.versions, a.sampling) == (
            b.token_ids, b.loss_mask, b.logprobs, b.versions, b.sampling)
    await gateway.close()


async def test_chat_seats_keep_the_sdk_and_ended_sessions_are_refused(served):
    gateway, _engine = served
    chat = await open_seat(gateway, gateway.async_client(), Policy(api="chat"), "p", "a")
    assert chat.agent.direct is None
    key = await gateway.create_session("p")
    session = gateway.end_session(key)
    with pytest.raises(GatewayError, match=f"session {session.session_id} has ended"):
        await complete_in_process(gateway, key, {"model": "p", "prompt": "hi"})
    chat.close()
    await gateway.close()


class CountingClient:
    """A shared client that counts the keyed copies seats make of it."""

    def __init__(self, inner) -> None:
        self.inner, self.keys = inner, []

    def with_options(self, *, api_key: str):
        self.keys.append(api_key)
        return self.inner.with_options(api_key=api_key)


async def test_a_direct_seat_never_builds_its_keyed_sdk_client(served):
    gateway, _engine = served
    client = CountingClient(gateway.async_client())
    direct = await open_seat(gateway, client, Policy(api="completions",
                                                     sampling=dict(SAMPLING)), "p", "a")
    await _two_turns(direct.agent)
    assert client.keys == []  # ~40 us per episode saved: no SDK copy on the direct path
    chat = await open_seat(gateway, client, Policy(api="chat", sampling=dict(SAMPLING)), "p", "b")
    await _two_turns(chat.agent)
    assert client.keys == [chat.key]  # built once, on first use, with the session's key
    direct.close()
    chat.close()
    await gateway.close()
