"""``FixedOpponents``: play a multi-agent env as one agent, the other seats played by agents."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ..agent import Agent
from ..env import AgentEnv, MultiAgentEnv
from ..errors import EnvError
from .base import _Forwarding


class FixedOpponents(_Forwarding, AgentEnv):
    """A ``MultiAgentEnv`` seen by ``learner`` as an ``AgentEnv``; ``opponents`` play the rest.

    Between the learner's turns the opponents act (concurrently when several must act at
    once); in simultaneous-move steps their actions are sent together with the learner's.
    The learner's rewards from all those env steps are summed into the reward of its step.
    The episode ends for the learner when the env ends (``agents`` empty); ``truncated`` is
    True if the learner was ever truncated, otherwise ``terminated`` is True. At the end each
    opponent's ``end_episode(its return)`` is awaited: ``opponent_returns`` and
    ``opponent_samples`` hold the results (e.g. for a frozen LLM opponent's session).

    Args:
        env: the multi-agent env.
        learner: the seat exposed as the single agent.
        opponents: ``{agent_id: Agent}`` for every other seat that may act.

    Raises:
        ValueError: ``learner`` or an opponent id is not in ``env.possible_agents``.
        EnvError: (during play) an agent without an opponent is asked to act, or the episode
            ends before the learner is asked to act at all.

    Example:
        >>> import areal_agents as aa
        >>> from areal_agents.testing import GenericMultiAgentEnv
        >>> ma = GenericMultiAgentEnv(possible_agents=["a", "b"])
        >>> env = aa.FixedOpponents(ma, learner="a", opponents={"b": aa.ScriptedAgent(lambda o: "x")})
        >>> isinstance(env, aa.AgentEnv)
        True
    """

    def __init__(
        self,
        env: MultiAgentEnv,
        learner: str = "player_0",
        opponents: Mapping[str, Agent] | None = None,
    ) -> None:
        if not isinstance(env, MultiAgentEnv):
            raise TypeError(f"FixedOpponents wraps a MultiAgentEnv, got {type(env).__name__}")
        opponents = dict(opponents or {})
        possible = list(env.possible_agents)
        unknown = sorted({learner, *opponents} - set(possible))
        if unknown:
            raise ValueError(
                f"FixedOpponents: {unknown} not in the env's possible_agents {possible}"
            )
        if learner in opponents:
            raise ValueError(f"FixedOpponents: the learner {learner!r} cannot also be an opponent")
        self.env = env
        self.learner = learner
        self.opponents = opponents
        self._obs: dict[str, Any] = {}
        self._pending = 0.0  # learner reward earned before its first action
        self.opponent_returns: dict[str, float] = {}
        self.opponent_samples: dict[str, list[Any]] = {}

    @property
    def spec(self) -> Any:
        """None unless set: the wrapped env's spec builds a multi-agent env, not this one."""
        return self._spec

    @spec.setter
    def spec(self, value: Any) -> None:
        self._spec = value

    def __getattr__(self, name: str) -> Any:
        if name == "sample_action":
            raise AttributeError(name)
        return super().__getattr__(name)

    @property
    def sample_action(self) -> Any:
        """``env.sample_action(learner)`` when the wrapped env defines ``sample_action``."""
        inner = getattr(self.env, "sample_action", None)
        if inner is None:
            raise AttributeError("sample_action")
        return lambda agent=None: inner(self.learner)

    async def _play_opponents(self, reward: float, state: dict[str, Any]) -> tuple[Any, float]:
        """Let opponents act until the learner must act or the env ends."""
        while self.env.agents and self.learner not in self._obs:
            reward = await self._env_step({}, reward, state)
        return self._obs.get(self.learner, []), reward

    async def _opponent_actions(self) -> dict[str, Any]:
        seats = [a for a in self._obs if a != self.learner]
        missing = [a for a in seats if a not in self.opponents]
        if missing:
            raise EnvError(
                f"FixedOpponents: {missing} must act but have no opponent agent; "
                f"pass opponents={{...}} for every seat other than {self.learner!r}"
            )
        acts = await asyncio.gather(*(self.opponents[a].act(self._obs[a]) for a in seats))
        return dict(zip(seats, acts, strict=True))

    async def _env_step(self, learner_action: dict[str, Any], reward: float, state: dict) -> float:
        actions = {**learner_action, **(await self._opponent_actions())}
        obs, rewards, _terms, truncs, infos = await self.env.step(actions)
        self._obs = obs
        reward += float(rewards.get(self.learner, 0.0))
        for agent, r in rewards.items():
            if agent in self.opponents:
                self.opponent_returns[agent] = self.opponent_returns.get(agent, 0.0) + float(r)
        state["truncated"] = state["truncated"] or bool(truncs.get(self.learner, False))
        if self.learner in infos:
            state["info"] = infos[self.learner]
        return reward

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        for agent in self.opponents.values():
            agent.reset()
        self.opponent_returns = dict.fromkeys(self.opponents, 0.0)
        self.opponent_samples = {}
        obs, infos = await self.env.reset(seed=seed, options=options)
        self._obs = obs
        state = {"truncated": False, "info": infos.get(self.learner, {})}
        obs, self._pending = await self._play_opponents(0.0, state)
        if self.learner not in self._obs:
            raise EnvError(
                f"FixedOpponents: the episode ended before {self.learner!r} was asked to act"
            )
        return obs, dict(state["info"])

    async def step(self, action: Any) -> Any:
        state = {"truncated": False, "info": {}}
        reward = await self._env_step({self.learner: action}, self._pending, state)
        self._pending = 0.0
        obs, reward = await self._play_opponents(reward, state)
        done = self.learner not in self._obs
        truncated = done and state["truncated"]
        if done:
            for agent_id, agent in self.opponents.items():
                ret = self.opponent_returns[agent_id]
                self.opponent_samples[agent_id] = list(await agent.end_episode(ret))
        return obs, reward, done and not truncated, truncated, dict(state["info"])
