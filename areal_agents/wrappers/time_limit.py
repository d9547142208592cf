"""``TimeLimit``: truncate an episode after a fixed number of steps."""

from __future__ import annotations

from typing import Any

from ..env import MultiAgentEnv
from .base import MultiAgentWrapper, Wrapper


def _check_steps(max_episode_steps: int) -> int:
    if not isinstance(max_episode_steps, int) or max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be a positive int, got {max_episode_steps!r}")
    return max_episode_steps


class TimeLimit(Wrapper):
    """Truncate after ``max_episode_steps`` steps (``truncated=True`` unless it terminated).

    ``TimeLimit(multi_agent_env, n)`` returns a ``MultiAgentTimeLimit``: after ``n`` steps every
    live agent gets ``truncations[a] = True``, ``obs`` is empty and ``agents`` becomes ``[]``.

    Example:
        >>> import asyncio, areal_agents as aa
        >>> from areal_agents.testing import GenericTestEnv
        >>> env = aa.TimeLimit(GenericTestEnv(), 2)
        >>> async def main():
        ...     await env.reset(seed=0)
        ...     await env.step("a")
        ...     return (await env.step("b"))[3]
        >>> asyncio.run(main())
        True
    """

    def __new__(cls, env: Any = None, *args: Any, **kwargs: Any) -> Any:
        if cls is TimeLimit and isinstance(env, MultiAgentEnv):
            return MultiAgentTimeLimit(env, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, env: Any, max_episode_steps: int) -> None:
        super().__init__(env)
        self.max_episode_steps = _check_steps(max_episode_steps)
        self.elapsed_steps = 0

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        result = await self.env.reset(seed=seed, options=options)
        self.elapsed_steps = 0
        return result

    async def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = await self.env.step(action)
        self.elapsed_steps += 1
        if self.elapsed_steps >= self.max_episode_steps and not terminated:
            truncated = True
        return obs, reward, terminated, truncated, info


class MultiAgentTimeLimit(MultiAgentWrapper):
    """``TimeLimit`` for a ``MultiAgentEnv`` (see ``TimeLimit``)."""

    def __init__(self, env: MultiAgentEnv, max_episode_steps: int) -> None:
        super().__init__(env)
        self.max_episode_steps = _check_steps(max_episode_steps)
        self.elapsed_steps = 0
        self._cut = False

    @property  # type: ignore[override]
    def agents(self) -> list[str]:
        return [] if self._cut else self.env.agents

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        result = await self.env.reset(seed=seed, options=options)
        self.elapsed_steps = 0
        self._cut = False
        return result

    async def step(self, actions: Any) -> Any:
        obs, rewards, terms, truncs, infos = await self.env.step(actions)
        self.elapsed_steps += 1
        live = list(self.env.agents)
        if self.elapsed_steps >= self.max_episode_steps and live:
            truncs = {**truncs, **{a: True for a in live if not terms.get(a, False)}}
            obs = {}
            self._cut = True
        return obs, rewards, terms, truncs, infos
