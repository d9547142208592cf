"""The sample path runs gateway -> trainer: agents only act; after the episode the trainer
takes each seat's session from the gateway and sets agent/policy/group/reward once."""

from __future__ import annotations

import asyncio

import pytest

import areal_agents as aa
from areal_agents.agent import Agent
from areal_agents.agents import ScriptedAgent
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.testing.envs import GenericMultiAgentEnv, GenericTestEnv
from areal_agents.trainers.episodes import EpisodeFailed, play
from areal_agents.trainers.llm_session import Seat, open_seat
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer


class SpyGateway(aa.Gateway):
    """Keeps every session it ends, to compare the samples with the session's records."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: list = []

    def end_session(self, key, *, drop=False):
        session = super().end_session(key, drop=drop)
        self.ended.append(session)
        return session


def _check_ids_are_the_records(samples, session) -> None:
    """Token ids equal the recorded turns' ids (prompt, then what the engine generated)."""
    want, _ = session.to_samples()
    assert [s.token_ids for s in samples] == [w.token_ids for w in want]
    first, last = session.turns[0], session.turns[-1]
    assert samples[0].token_ids[: len(first.prompt_ids)] == first.prompt_ids
    assert samples[-1].token_ids[-len(last.completion_ids):] == last.completion_ids
    assert samples[-1].logprobs[-len(last.completion_ids):] == last.logprobs


@pytest.fixture
def gateway():
    _model, tokenizer = aa.models.tiny("xs", seed=0)
    gw = SpyGateway()
    for name in ("p", "q"):
        gw.add_policy(name, [ScriptedEngine(["ab", "c"], tokenizer=tokenizer)], tokenizer)
    return gw  # each test closes it


async def test_samples_go_from_the_gateway_to_the_trainer_with_their_labels(gateway):
    client = gateway.async_client()
    policy = Policy(api="completions", sampling={"max_tokens": 4})

    async def seat(agent_id: str, name: str, greedy: bool) -> Seat:
        return await open_seat(gateway, client, policy, name, agent_id, greedy)

    env_returns: dict[str, float] = {}

    def bonus(episode) -> float:
        env_returns.update(episode.returns)
        return 0.5

    env = GenericMultiAgentEnv(["a0", "a1", "judge"], episode_length=5)
    by_policy, stats = await play(
        env, 11, policy_of={"a0": "p", "a1": "q", "judge": "q"},
        fixed_agents={"judge": ScriptedAgent(lambda o: "fixed")}, open_seat=seat,
        reward_fns=[bonus])
    assert sorted(by_policy) == ["p", "q"]
    sessions = {s.metadata["agent"]: s for s in gateway.ended}
    assert sorted(sessions) == ["a0", "a1"]  # the fixed judge has no session
    for agent_id, name in (("a0", "p"), ("a1", "q")):
        samples = by_policy[name]
        assert {(s.agent, s.policy, s.group, s.reward) for s in samples} == {
            (agent_id, name, "11", stats.returns[agent_id])}
        assert stats.returns[agent_id] == env_returns[agent_id] + 0.5
        assert len({s.meta["episode"] for s in samples}) == 1
        _check_ids_are_the_records(samples, sessions[agent_id])
    assert gateway._sessions == {}
    await gateway.close()


async def test_an_agent_with_no_end_episode_of_its_own_is_trained(gateway):
    """The seat's agent only acts (``Agent.end_episode`` is the base no-op)."""

    class Chat(Agent):
        def __init__(self, client) -> None:
            self.client = client

        async def act(self, observation):
            reply = await self.client.chat.completions.create(
                model="p", messages=observation, max_tokens=4)
            return reply.choices[0].message.content

    assert "end_episode" not in vars(Chat)
    client = gateway.async_client()

    async def seat(agent_id: str, name: str, greedy: bool) -> Seat:
        key = await gateway.create_session(name, {"agent": agent_id})
        return Seat(agent_id, name, Chat(client.with_options(api_key=key)), gateway, key)

    env = GenericTestEnv(episode_length=2)
    by_policy, stats = await play(env, 3, policy_of={"agent": "p"}, fixed_agents={},
                                  open_seat=seat, reward_fns=[])
    (session,) = gateway.ended
    assert len(session.turns) == 2 and by_policy["p"]
    assert {(s.agent, s.policy, s.group, s.reward) for s in by_policy["p"]} == {
        ("agent", "p", "3", stats.returns["agent"])}
    _check_ids_are_the_records(by_policy["p"], session)
    await gateway.close()


async def test_failed_or_cancelled_episodes_leave_no_session_open(gateway):
    client = gateway.async_client()
    policy = Policy(sampling={"max_tokens": 2})
    acted = asyncio.Event()

    async def seat(agent_id: str, name: str, greedy: bool) -> Seat:
        return await open_seat(gateway, client, policy, name, agent_id, greedy)

    def crash(env, action):
        raise RuntimeError("env crashed")

    async def hang(env, action):  # a straggler cancelled while its env steps
        acted.set()
        await asyncio.sleep(3600)

    failing = GenericTestEnv(step_fn=crash)
    with pytest.raises(EpisodeFailed, match="env crashed"):
        await play(failing, 1, policy_of={"agent": "p"}, fixed_agents={}, open_seat=seat,
                   reward_fns=[])
    assert gateway._sessions == {}

    hanging = GenericTestEnv()
    hanging.step = lambda action: hang(hanging, action)  # type: ignore[method-assign]
    task = asyncio.create_task(play(hanging, 2, policy_of={"agent": "p"}, fixed_agents={},
                                    open_seat=seat, reward_fns=[]))
    await asyncio.wait_for(acted.wait(), 10)
    assert len(gateway._sessions) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gateway._sessions == {}  # the cancelled episode's session is dropped too
    await gateway.close()


async def test_trainer_episode_samples_come_from_the_session_records(tmp_path):
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(sampling={"temperature": 1.0, "max_tokens": 2})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(lambda o: "A")},
        batch_size=2, group_size=2, progress=False)
    try:
        await trainer.setup()
        ended: list = []
        end_session = trainer.gateway.end_session

        def spy(key, *, drop=False):
            ended.append(end_session(key, drop=drop))
            return ended[-1]

        trainer.gateway.end_session = spy
        by_policy = await trainer._episode(5, 1)
        (stats,) = trainer._stats.by_seed[5]
        (session,) = ended
        samples = by_policy["speaker"]
        assert samples and {(s.agent, s.policy, s.group, s.reward) for s in samples} == {
            ("speaker", "speaker", "5", stats.returns["speaker"])}
        _check_ids_are_the_records(samples, session)
        assert trainer.gateway._sessions == {}
    finally:
        await trainer.aclose()
