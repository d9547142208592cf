"""``TransformObservation``: apply a function to every observation (e.g. rewrite messages)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..env import MultiAgentEnv
from .base import MultiAgentWrapper, Wrapper


class TransformObservation(Wrapper):
    """Replace each observation ``obs`` by ``fn(obs)``.

    For a ``MultiAgentEnv`` (returns a ``MultiAgentTransformObservation``) ``fn`` is applied to
    each agent's observation. ``fn`` must be deterministic for seeding to stay deterministic.

    Example:
        >>> import asyncio, areal_agents as aa
        >>> from areal_agents.testing import GenericTestEnv
        >>> shout = lambda msgs: [{**m, "content": m["content"].upper()} for m in msgs]
        >>> env = aa.TransformObservation(GenericTestEnv(), shout)
        >>> asyncio.run(env.reset(seed=0))[0][0]["content"]
        'SAY SOMETHING'
    """

    def __new__(cls, env: Any = None, *args: Any, **kwargs: Any) -> Any:
        if cls is TransformObservation and isinstance(env, MultiAgentEnv):
            return MultiAgentTransformObservation(env, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, env: Any, fn: Callable[[Any], Any]) -> None:
        super().__init__(env)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        self.fn = fn

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        obs, info = await self.env.reset(seed=seed, options=options)
        return self.fn(obs), info

    async def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = await self.env.step(action)
        return self.fn(obs), reward, terminated, truncated, info


class MultiAgentTransformObservation(MultiAgentWrapper):
    """``TransformObservation`` for a ``MultiAgentEnv``: ``fn`` maps each agent's observation."""

    def __init__(self, env: MultiAgentEnv, fn: Callable[[Any], Any]) -> None:
        super().__init__(env)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        self.fn = fn

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        obs, infos = await self.env.reset(seed=seed, options=options)
        return {a: self.fn(o) for a, o in obs.items()}, infos

    async def step(self, actions: Any) -> Any:
        obs, rewards, terms, truncs, infos = await self.env.step(actions)
        return {a: self.fn(o) for a, o in obs.items()}, rewards, terms, truncs, infos
