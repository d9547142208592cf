"""Act when ready: each agent's action is applied as soon as it arrives (``act_when_ready``
envs); the env guard, ``run_episode``, ``check_env`` and the Trainer."""

from __future__ import annotations

import asyncio

import pytest

from areal_agents.agent import Agent
from areal_agents.checker import check_env
from areal_agents.env import MultiAgentEnv
from areal_agents.episode import run_episode
from areal_agents.errors import MissingAction
from areal_agents.messages import user
from areal_agents.wrappers.time_limit import MultiAgentTimeLimit


class TwoSpeedEnv(MultiAgentEnv):
    """Both agents observe at reset; each is observed again after its action until it made
    its number of ``turns``; ``applied`` records the order actions were applied in."""

    act_when_ready = True
    possible_agents = ["fast", "slow"]  # noqa: RUF012

    def __init__(self, turns: dict[str, int] | None = None, reobserve_waiting: bool = False):
        self.turns = dict(turns or {"fast": 4, "slow": 1})
        self.reobserve_waiting = reobserve_waiting  # a broken env: observes pending agents
        self.agents, self.applied, self.left = [], [], {}

    async def reset(self, *, seed=None, options=None):
        await super().reset(seed=seed)
        self.left, self.applied = dict(self.turns), []
        self.agents = list(self.possible_agents)
        return {a: [user(f"{a}: turn 0")] for a in self.agents}, {}

    async def step(self, actions):
        for a, x in actions.items():
            self.applied.append((a, x))
            self.left[a] -= 1
        self.agents = [a for a in self.agents if self.left[a] > 0]
        observe = self.agents if self.reobserve_waiting else [a for a in actions if a in self.agents]
        obs = {a: [user(f"{a}: turn {self.turns[a] - self.left[a]}")] for a in observe}
        return (obs, {a: 1.0 for a in actions}, {a: self.left[a] == 0 for a in actions},
                {a: False for a in actions}, {})

    def sample_action(self, agent=None):
        return "0"


class Counting(Agent):
    """Answers ``<name><n>`` at once; opens ``gate`` when asked for its ``open_at``-th action."""

    def __init__(self, name: str, gate: asyncio.Event | None = None, open_at: int = 0):
        self.name, self.gate, self.open_at, self.calls = name, gate, open_at, 0

    async def act(self, observation):
        self.calls += 1
        if self.gate is not None and self.calls == self.open_at:
            self.gate.set()
        return f"{self.name}{self.calls}"


class Gated(Agent):
    """Answers only once ``gate`` is set (a slow LLM call)."""

    def __init__(self, gate: asyncio.Event):
        self.gate = gate

    async def act(self, observation):
        await self.gate.wait()
        return "slow1"


async def test_the_fast_agents_actions_are_applied_before_the_slow_agents_first():
    # the slow agent answers only once the fast one is asked for its 4th action, i.e. after
    # its 3rd was applied: with a per-step barrier (both act, then one step) this never ends
    gate = asyncio.Event()
    env = TwoSpeedEnv()
    agents = {"fast": Counting("fast", gate, open_at=4), "slow": Gated(gate)}
    episode = await asyncio.wait_for(run_episode(env, agents, seed=0, raise_errors=True), 60)
    order = [a for a, _ in env.applied]
    assert order[:3] == ["fast", "fast", "fast"]
    assert sorted(order) == ["fast"] * 4 + ["slow"]
    assert [x for a, x in env.applied if a == "fast"] == ["fast1", "fast2", "fast3", "fast4"]
    assert episode.length == 5 and episode.status == "terminated"
    assert episode.returns == {"fast": 4.0, "slow": 1.0}
    assert [m["content"] for m in episode.messages["fast"] if m["role"] == "assistant"] == [
        "fast1", "fast2", "fast3", "fast4"]


async def test_max_steps_truncates_and_stops_the_agents_still_thinking():
    gate = asyncio.Event()  # never set: the slow agent is still thinking at the end
    env = TwoSpeedEnv({"fast": 10, "slow": 1})
    episode = await asyncio.wait_for(run_episode(
        env, {"fast": Counting("fast"), "slow": Gated(gate)}, seed=0, max_steps=3,
        raise_errors=True), 60)
    assert episode.status == "truncated" and episode.length == 3
    assert [a for a, _ in env.applied] == ["fast"] * 3


async def test_the_guard_takes_a_subset_and_keeps_the_others_able_to_act():
    env = TwoSpeedEnv()
    await env.reset(seed=0)
    await env.step({"fast": "a"})
    assert env.agents_to_act == {"fast", "slow"}  # slow still may act, fast observed again
    await env.step({"slow": "b"})
    assert env.agents_to_act == {"fast"}
    with pytest.raises(MissingAction, match=r"expected actions for at least one of \['fast'\]"):
        await env.step({})


async def test_a_wrapped_act_when_ready_env_keeps_the_contract():
    env = MultiAgentTimeLimit(TwoSpeedEnv(), max_episode_steps=50)
    assert env.act_when_ready
    gate = asyncio.Event()
    agents = {"fast": Counting("fast", gate, open_at=4), "slow": Gated(gate)}
    episode = await asyncio.wait_for(run_episode(env, agents, seed=0, raise_errors=True), 60)
    assert episode.length == 5


async def test_check_env_checks_the_act_when_ready_contract():
    report = await check_env(TwoSpeedEnv(), raise_on_failure=False)
    assert report.ok, str(report)
    assert "act_when_ready" in report.passed
    broken = await check_env(TwoSpeedEnv(reobserve_waiting=True), raise_on_failure=False)
    assert broken.failed("act_when_ready")
    (failure,) = [f for f in broken.failures if f.check == "act_when_ready"]
    assert failure.seen == "observations for ['slow']"


class AllOrNothingEnv(TwoSpeedEnv):
    """Declares act_when_ready but needs every live agent's action in each step."""

    async def step(self, actions):
        for a in self.agents:
            actions[a]  # KeyError for an agent still thinking
        return await super().step(actions)


async def test_check_env_fails_an_env_that_needs_every_action():
    report = await check_env(AllOrNothingEnv(), raise_on_failure=False)
    (failure,) = [f for f in report.failures if f.check == "act_when_ready"]
    assert failure.expected == ("act_when_ready: step() with 'fast' alone while ['fast', 'slow'] "
                                "may act")
    assert failure.seen == "KeyError: 'slow'"


async def test_the_trainer_plays_act_when_ready_envs_without_a_barrier():
    from areal_agents.trainers.policy import Policy
    from areal_agents.trainers.trainer import Trainer

    sampling = {"temperature": 1.0, "max_tokens": 1}
    trainer = Trainer(env=lambda: TwoSpeedEnv({"fast": 3, "slow": 1}),
                      policies={"f": Policy(lr=1e-3, sampling=sampling),
                                "s": Policy(lr=1e-3, sampling=sampling, seed=1)},
                      policy_map={"fast": "f", "slow": "s"}, batch_size=2, group_size=2,
                      progress=False)
    try:
        history = await trainer.afit(1)
    finally:
        await trainer.aclose()
    row = history[-1]
    assert (row["policy/f/num_samples"], row["policy/s/num_samples"]) == (2.0, 2.0)
    assert row["train/episode_length"] == 4.0  # one env step per action (3 fast + 1 slow)
    assert (row["train/fast/reward"], row["train/slow/reward"]) == (3.0, 1.0)
