"""Wrapper base classes: attribute forwarding for single- and multi-agent envs."""

from __future__ import annotations

from typing import Any

from ..env import AgentEnv, MultiAgentEnv


class _Forwarding:
    """Forwards public attributes not found on the wrapper to ``self.env``."""

    env: Any
    _spec: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)

    @property
    def spec(self) -> Any:
        """The wrapper's spec if set (``make`` sets it), else the wrapped env's."""
        return self._spec if self._spec is not None else self.env.spec

    @spec.setter
    def spec(self, value: Any) -> None:
        self._spec = value

    @property
    def np_random(self) -> Any:
        return self.env.np_random

    @property
    def np_random_seed(self) -> int | None:
        return self.env.np_random_seed

    @property
    def metadata(self) -> dict[str, Any]:  # type: ignore[override]
        return self.env.metadata

    @property
    def render_mode(self) -> str | None:  # type: ignore[override]
        return self.env.render_mode

    @property
    def unwrapped(self) -> Any:
        return self.env.unwrapped

    def render(self) -> Any:
        return self.env.render()

    async def close(self) -> None:
        await self.env.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}{self.env!r}>"


class Wrapper(_Forwarding, AgentEnv):
    """Base of single-agent wrappers: ``reset``/``step`` pass through unless overridden.

    Raises:
        TypeError: ``env`` is not an ``AgentEnv`` (use ``MultiAgentWrapper`` for multi-agent envs).
    """

    def __init__(self, env: AgentEnv) -> None:
        if not isinstance(env, AgentEnv):
            raise TypeError(f"{type(self).__name__} wraps an AgentEnv, got {type(env).__name__}")
        self.env = env

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        return await self.env.reset(seed=seed, options=options)

    async def step(self, action: Any) -> Any:
        return await self.env.step(action)


class MultiAgentWrapper(_Forwarding, MultiAgentEnv):
    """Base of multi-agent wrappers; forwards ``agents`` and ``possible_agents``."""

    def __init__(self, env: MultiAgentEnv) -> None:
        if not isinstance(env, MultiAgentEnv):
            raise TypeError(
                f"{type(self).__name__} wraps a MultiAgentEnv, got {type(env).__name__}"
            )
        self.env = env

    @property  # type: ignore[override]
    def agents(self) -> list[str]:
        return self.env.agents

    @property  # type: ignore[override]
    def possible_agents(self) -> list[str]:
        return self.env.possible_agents

    @property  # type: ignore[override]
    def act_when_ready(self) -> bool:
        return self.env.act_when_ready

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        return await self.env.reset(seed=seed, options=options)

    async def step(self, actions: Any) -> Any:
        return await self.env.step(actions)


def wrap(
    env: AgentEnv | MultiAgentEnv, single: type, multi: type, *args: Any, **kwargs: Any
) -> Any:
    """Build the single- or multi-agent variant of a wrapper depending on ``env``'s kind."""
    cls = multi if isinstance(env, MultiAgentEnv) else single
    return cls(env, *args, **kwargs)
