"""Test envs: ``GenericTestEnv`` / ``GenericMultiAgentEnv`` built from functions (make broken
envs inline) and ``DynamicAgentsEnv`` (agents join/leave, answers after random delays)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np

from ..env import AgentEnv, MultiAgentEnv
from ..messages import parse_action, user


def _default_reset(env: GenericTestEnv) -> tuple[Any, dict[str, Any]]:
    env.target = int(env.np_random.integers(100))
    return [user("say something")], {"target": env.target}


def _default_step(env: GenericTestEnv, action: Any) -> tuple[Any, float, bool, bool, dict]:
    text = parse_action(action)["content"] or ""
    env.count += 1
    noise = int(env.np_random.integers(100))
    done = env.count >= env.episode_length
    return [user(f"{noise}: you said {text!r}")], float(len(text) % 2), done, False, {}


class GenericTestEnv(AgentEnv):
    """A single-agent env whose ``reset``/``step`` are given functions.

    Args:
        reset_fn: ``reset_fn(env) -> (obs, info)``, called after ``env.np_random`` is seeded and
            ``env.count`` zeroed. Default: one user message; seeded ``env.target``.
        step_fn: ``step_fn(env, action) -> (obs, reward, terminated, truncated, info)``.
            Default: echoes the action with seeded noise, ends after ``episode_length`` steps.
        episode_length: used by the default ``step_fn``.
        guards: False removes the misuse guards (a deliberately broken env for checker tests).
        sample_action_fn: if given, becomes ``env.sample_action(agent=None)``.
    """

    def __init__(
        self,
        reset_fn: Callable[..., Any] | None = None,
        step_fn: Callable[..., Any] | None = None,
        *,
        episode_length: int = 5,
        guards: bool = True,
        sample_action_fn: Callable[[], str] | None = None,
    ) -> None:
        self.reset_fn = reset_fn or _default_reset
        self.step_fn = step_fn or _default_step
        self.episode_length = episode_length
        self.guards = guards
        self.count = 0
        self.target = 0
        if sample_action_fn is not None:
            self.sample_action = lambda agent=None: sample_action_fn()
        if not guards:
            self.step = self._raw_step  # type: ignore[method-assign]

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        await super().reset(seed=seed)
        self.count = 0
        return self.reset_fn(self)

    async def _raw_step(self, action: Any) -> Any:
        return self.step_fn(self, action)

    async def step(self, action: Any) -> Any:
        return self.step_fn(self, action)


def _default_multi_reset(env: GenericMultiAgentEnv) -> tuple[dict, dict]:
    env.agents = list(env.possible_agents)
    first = env.possible_agents[0]
    return {first: [user(f"you start; seed number {int(env.np_random.integers(100))}")]}, {}


def _default_multi_step(env: GenericMultiAgentEnv, actions: dict) -> tuple:
    env.count += 1
    rewards = {a: float(len(parse_action(x)["content"] or "") % 2) for a, x in actions.items()}
    nxt = list(env.agents) if env.simultaneous else [env.agents[env.count % len(env.agents)]]
    done = env.count >= env.episode_length
    terms = {a: done for a in env.agents}
    if done:
        env.agents = []
        nxt = []
    noise = int(env.np_random.integers(100))
    return {a: [user(f"{noise}: your turn")] for a in nxt}, rewards, terms, {}, {}


class GenericMultiAgentEnv(MultiAgentEnv):
    """A multi-agent env whose ``reset``/``step`` are given functions.

    Args:
        possible_agents: the agent ids (default ``["player_0", "player_1"]``).
        reset_fn: ``reset_fn(env) -> (obs, infos)``; must set ``env.agents``. Default: the first
            agent acts (all agents when ``simultaneous``).
        step_fn: ``step_fn(env, actions) -> (obs, rewards, terminations, truncations, infos)``.
            Default: agents take turns (or all act each step), ``episode_length`` steps.
        simultaneous: default functions ask every agent to act each step.
        guards: False removes the misuse guards (a deliberately broken env).
    """

    def __init__(
        self,
        possible_agents: list[str] | None = None,
        reset_fn: Callable[..., Any] | None = None,
        step_fn: Callable[..., Any] | None = None,
        *,
        simultaneous: bool = False,
        episode_length: int = 6,
        guards: bool = True,
    ) -> None:
        self.possible_agents = list(possible_agents or ["player_0", "player_1"])
        self.agents = []
        self.simultaneous = simultaneous
        self.episode_length = episode_length
        self.reset_fn = reset_fn or _default_multi_reset
        self.step_fn = step_fn or _default_multi_step
        self.count = 0
        self.guards = guards
        if not guards:
            self.step = self._raw_step  # type: ignore[method-assign]

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        await super().reset(seed=seed)
        self.count = 0
        obs, infos = self.reset_fn(self)
        if self.simultaneous and self.reset_fn is _default_multi_reset:
            obs = {a: obs[self.possible_agents[0]] for a in self.agents}
        return obs, infos

    async def _raw_step(self, actions: Any) -> Any:
        return self.step_fn(self, actions)

    async def step(self, actions: Any) -> Any:
        return self.step_fn(self, actions)


class DynamicAgentsEnv(MultiAgentEnv):
    """Agents join and leave mid-episode; the env answers after random asyncio delays.

    Each step asks a random non-empty subset of the live agents to act; afterwards a live
    agent may leave (``terminations[a] = True``) and one that never took part may join (an
    agent that left never returns, as PettingZoo requires). Rewards go to
    the actors (1.0 for an even-length answer) and occasionally to an agent that did not act.
    Everything but the delays comes from ``np_random`` (deterministic per seed); the delays
    use a separate RNG, and a cancelled ``step`` changes nothing.

    Args:
        num_agents: size of ``possible_agents`` (``agent_0`` ...).
        num_steps: episode length in steps.
        max_delay: upper bound of each answer's delay in seconds.
    """

    def __init__(self, num_agents: int = 4, num_steps: int = 8, max_delay: float = 0.002) -> None:
        if num_agents < 2:
            raise ValueError(f"DynamicAgentsEnv needs num_agents >= 2, got {num_agents}")
        self.possible_agents = [f"agent_{i}" for i in range(num_agents)]
        self.agents = []
        self.num_steps = num_steps
        self.max_delay = max_delay
        self._delays = np.random.default_rng()
        self._seen: set[str] = set()
        self.count = 0

    def sample_action(self, agent: str | None = None) -> str:
        """A random word (from an RNG independent of ``np_random``)."""
        return str(self._delays.choice(["a", "bb", "ccc", "dddd"]))

    def _ask(self) -> dict[str, Any]:
        k = int(self.np_random.integers(1, len(self.agents) + 1))
        picked = self.np_random.choice(len(self.agents), size=k, replace=False)
        return {self.agents[i]: [user(f"step {self.count}: speak")] for i in sorted(picked)}

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        await super().reset(seed=seed)
        await asyncio.sleep(float(self._delays.uniform(0, self.max_delay)))
        self.count = 0
        self.agents = [a for a in self.possible_agents if self.np_random.random() < 0.6]
        self.agents = self.agents or [self.possible_agents[0]]
        self._seen = set(self.agents)
        return self._ask(), {a: {} for a in self.agents}

    async def step(self, actions: Any) -> Any:
        await asyncio.sleep(float(self._delays.uniform(0, self.max_delay)))
        self.count += 1
        rewards = {
            a: float(len(parse_action(x)["content"] or "") % 2 == 0) for a, x in actions.items()
        }
        bystander = self.possible_agents[int(self.np_random.integers(len(self.possible_agents)))]
        if bystander in self.agents and bystander not in rewards:
            rewards[bystander] = 0.5
        terms: dict[str, bool] = {}
        if self.count >= self.num_steps:
            terms = {a: True for a in self.agents}
            self.agents = []
            return {}, rewards, terms, {}, {}
        if len(self.agents) > 1 and self.np_random.random() < 0.3:
            leaver = self.agents[int(self.np_random.integers(len(self.agents)))]
            self.agents = [a for a in self.agents if a != leaver]
            terms[leaver] = True
        absent = [a for a in self.possible_agents if a not in self._seen]  # no revival
        if absent and self.np_random.random() < 0.3:
            joiner = absent[int(self.np_random.integers(len(absent)))]
            self._seen.add(joiner)
            self.agents = sorted([*self.agents, joiner])
        return self._ask(), rewards, terms, {}, {a: {} for a in self.agents}
