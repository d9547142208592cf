"""run_episode: single/multi-agent, concurrency, failures, samples, agents."""

from __future__ import annotations

import asyncio

import pytest

import areal_agents as aa
from areal_agents.testing import DynamicAgentsEnv, GenericMultiAgentEnv, GenericTestEnv


class Recording(aa.Agent):
    """Records observations, resets and end_episode calls; ``peak`` = most concurrent acts."""

    live = 0
    peak = 0

    def __init__(self, action="ab", delay: float = 0.0) -> None:
        self.action, self.delay = action, delay
        self.observations: list = []
        self.resets = 0
        self.ended_with: list[float] = []

    def reset(self) -> None:
        self.resets += 1

    async def act(self, observation):
        self.observations.append(observation)
        Recording.live += 1
        Recording.peak = max(Recording.peak, Recording.live)
        await asyncio.sleep(self.delay)
        Recording.live -= 1
        return self.action

    async def end_episode(self, episode_return):
        self.ended_with.append(episode_return)
        return [f"sample-{episode_return}"]


async def test_single_agent_episode_record():
    agent = Recording("abc")
    env = GenericTestEnv(episode_length=3)
    ep = await aa.run_episode(env, agent, seed=5)
    assert ep.status == "terminated" and ep.error is None and ep.seed == 5
    assert ep.agents == ["agent"] and ep.length == 3
    assert ep.rewards == {"agent": [1.0, 1.0, 1.0]} and ep.returns == {"agent": 3.0}
    assert agent.resets == 1 and agent.ended_with == [3.0]
    assert ep.samples == {"agent": ["sample-3.0"]}
    roles = [m["role"] for m in ep.messages["agent"]]
    assert roles == ["user"] + ["assistant", "user"] * 3
    # the agent saw exactly the env's observations
    assert agent.observations[0] == [{"role": "user", "content": "say something"}]
    assert agent.observations[1] == ep.messages["agent"][2:3]
    again = await aa.run_episode(
        GenericTestEnv(episode_length=3), {"agent": Recording("abc")}, seed=5
    )
    assert again.messages["agent"] == ep.messages["agent"]
    named = await aa.run_episode(
        GenericTestEnv(episode_length=3), {"solver": Recording("abc")}, seed=5
    )
    assert named.agents == ["solver"] and named.messages["solver"] == ep.messages["agent"]
    assert named.returns == {"solver": 3.0} and named.samples == {"solver": ["sample-3.0"]}
    assert "<table>" in ep._repr_html_() and "terminated" in ep._repr_html_()


async def test_max_steps_truncates():
    ep = await aa.run_episode(GenericTestEnv(episode_length=10), Recording(), seed=0, max_steps=2)
    assert (ep.status, ep.length) == ("truncated", 2)
    menv = GenericMultiAgentEnv(episode_length=10)
    ep = await aa.run_episode(menv, {a: Recording() for a in menv.possible_agents}, max_steps=3)
    assert (ep.status, ep.length) == ("truncated", 3)


async def test_time_limit_status_is_truncated():
    ep = await aa.run_episode(
        aa.TimeLimit(GenericTestEnv(episode_length=10), 2), Recording(), seed=0
    )
    assert (ep.status, ep.length) == ("truncated", 2)


async def test_multi_agent_simultaneous_agents_act_concurrently():
    Recording.live = Recording.peak = 0
    env = GenericMultiAgentEnv(["x", "y", "z"], simultaneous=True, episode_length=2)
    agents = {a: Recording("a", delay=0.01) for a in env.possible_agents}
    ep = await aa.run_episode(env, agents, seed=0)
    assert Recording.peak == 3  # all three were inside act() at once
    assert ep.status == "terminated" and ep.length == 2
    assert ep.returns == {"x": 2.0, "y": 2.0, "z": 2.0}
    assert all(a.ended_with == [2.0] for a in agents.values())


async def test_dynamic_agents_env_runs_and_is_deterministic():
    env = DynamicAgentsEnv(num_agents=4, num_steps=6)
    make_agents = lambda: {a: Recording("ab") for a in env.possible_agents}  # noqa: E731
    first = await aa.run_episode(env, make_agents(), seed=3)
    second = await aa.run_episode(
        DynamicAgentsEnv(num_agents=4, num_steps=6), make_agents(), seed=3
    )
    assert first.status == "terminated" and first.length == 6
    assert first.messages == second.messages and first.rewards == second.rewards


async def test_failures_become_failed_status_or_raise():
    class Boom(aa.Agent):
        async def act(self, observation):
            raise RuntimeError("agent exploded")

    ep = await aa.run_episode(GenericTestEnv(), Boom(), seed=0)
    assert ep.status == "failed" and ep.error == "RuntimeError: agent exploded"
    with pytest.raises(RuntimeError, match="agent exploded"):
        await aa.run_episode(GenericTestEnv(), Boom(), seed=0, raise_errors=True)

    def bad_step(env, action):
        raise ValueError("env broke")

    ep = await aa.run_episode(GenericTestEnv(step_fn=bad_step), Recording(), seed=0)
    assert ep.status == "failed" and ep.error == "ValueError: env broke" and ep.length == 0


async def test_live_agents_with_nobody_to_act_fail_clearly():
    def step_fn(env, actions):
        return {}, {}, {}, {}, {}  # agents stay live, nobody asked to act

    env = GenericMultiAgentEnv(["x", "y"], step_fn=step_fn)
    ep = await aa.run_episode(env, {"x": Recording(), "y": Recording()}, seed=0)
    assert ep.status == "failed" and ep.length == 1
    assert "live but none was asked to act" in ep.error


async def test_agent_mapping_is_validated():
    env = GenericMultiAgentEnv(["x", "y"])
    with pytest.raises(ValueError, match=r"no agent for \['y'\]"):
        await aa.run_episode(env, {"x": Recording()})
    with pytest.raises(TypeError, match="needs a dict"):
        await aa.run_episode(env, Recording())
    with pytest.raises(ValueError, match="takes one agent"):
        await aa.run_episode(GenericTestEnv(), {"a": Recording(), "b": Recording()})


async def test_builtin_agents():
    ep = await aa.run_episode(GenericTestEnv(), aa.RandomAgent(["a", "bb"], seed=1), seed=0)
    ep2 = await aa.run_episode(GenericTestEnv(), aa.RandomAgent(["a", "bb"], seed=1), seed=0)
    assert ep.messages == ep2.messages and ep.length == 5
    legal = aa.RandomAgent(lambda obs: [len(obs)], seed=0)
    assert await legal.act([1, 2]) == 2
    with pytest.raises(ValueError, match="no actions"):
        await aa.RandomAgent(lambda obs: []).act(None)
    with pytest.raises(ValueError, match="at least one action"):
        aa.RandomAgent([])

    async def async_fn(obs):
        return "async!"

    assert await aa.ScriptedAgent(async_fn).act([]) == "async!"
    shown: list[str] = []
    human = aa.HumanAgent(input_fn=lambda prompt: "typed", output_fn=shown.append)
    assert await human.act([{"role": "user", "content": "hello"}]) == "typed"
    assert shown == ["[user] hello"]
    assert await aa.agents.ScriptedAgent(lambda o: "x").end_episode(1.0) == []
