"""Synchronous Gymnasium / PettingZoo adapters of the async envs.

Observations become ``Text`` strings: the new messages rendered as ASCII JSON
(``json.dumps(obs, ensure_ascii=True)``). Actions are ``Text`` strings: the assistant's
content, or a JSON-encoded assistant message dict (``{"role": "assistant", ...}``, for tool
calls). The async env runs on a private event loop owned by the adapter (in a helper thread
when the caller's thread already runs a loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import weakref
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from .env import AgentEnv, MultiAgentEnv

CHARSET = "".join(chr(i) for i in range(32, 127))  # printable ASCII: what ensure_ascii JSON uses
MAX_OBS_CHARS = 1 << 20
MAX_ACTION_CHARS = 4096


def text_space(max_length: int) -> spaces.Text:
    """A ``Text`` space over printable ASCII."""
    return spaces.Text(max_length=max_length, min_length=0, charset=CHARSET)


def render_obs(obs: Any) -> str:
    """An observation (messages) as ASCII JSON."""
    return json.dumps(obs, ensure_ascii=True, default=str)


def decode_action(action: Any) -> Any:
    """A ``Text`` action: a JSON assistant message dict is decoded, anything else is kept."""
    if isinstance(action, str) and action.startswith("{"):
        try:
            value = json.loads(action)
        except ValueError:
            return action
        if isinstance(value, dict) and value.get("role") == "assistant":
            return value
    return action


class _Loop:
    """A private event loop driving one async env from synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # an adapter dropped without close() still releases its loop
        weakref.finalize(self, self.loop.close)

    def run(self, coro: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self.loop.run_until_complete(coro)
        if self._pool is None:  # called from async code: run our loop in a helper thread
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aa-adapter")
        return self._pool.submit(self.loop.run_until_complete, coro).result()

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class GymnasiumAdapter(gymnasium.Env):
    """An ``AgentEnv`` as a synchronous ``gymnasium.Env`` (see the module docstring)."""

    def __init__(self, env: AgentEnv) -> None:
        if not isinstance(env, AgentEnv):
            raise TypeError(
                f"to_gymnasium takes an AgentEnv, got {type(env).__name__}; "
                "use to_pettingzoo for a MultiAgentEnv"
            )
        self.env = env
        self.observation_space = text_space(MAX_OBS_CHARS)
        self.action_space = text_space(MAX_ACTION_CHARS)
        self.metadata = {"render_modes": [], **dict(env.metadata)}
        self.render_mode = env.render_mode
        self._runner = _Loop()
        self._closed = False

    @property
    def _np_random(self) -> np.random.Generator | None:  # read by gymnasium's checker
        return self.env.unwrapped._np_random

    @_np_random.setter
    def _np_random(self, value: np.random.Generator | None) -> None:
        self.env.unwrapped._np_random = value

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        obs, info = self._runner.run(self.env.reset(seed=seed, options=options))
        return render_obs(obs), dict(info)

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self._runner.run(
            self.env.step(decode_action(action))
        )
        return render_obs(obs), float(reward), bool(terminated), bool(truncated), dict(info)

    def render(self) -> Any:
        return self.env.render()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._runner.run(self.env.close())
        self._runner.close()


def to_gymnasium(env: AgentEnv) -> GymnasiumAdapter:
    """Wrap an ``AgentEnv`` as a synchronous ``gymnasium.Env`` with ``Text`` spaces.

    Raises:
        TypeError: ``env`` is not an ``AgentEnv``.

    Example:
        >>> import areal_agents as aa
        >>> from areal_agents.testing import GenericTestEnv
        >>> genv = aa.to_gymnasium(GenericTestEnv())
        >>> genv.reset(seed=0)[0]
        '[{"role": "user", "content": "say something"}]'
        >>> genv.close()
    """
    return GymnasiumAdapter(env)


def to_pettingzoo(env: MultiAgentEnv) -> Any:
    """Wrap a ``MultiAgentEnv`` as a synchronous ``pettingzoo.ParallelEnv`` with ``Text`` spaces.

    Every live agent gets an observation each step (``"[]"`` when it has no new messages) and
    ``infos[agent]["acting"]`` says whether the env asked it to act; actions of agents not
    asked to act are dropped. ``terminations``/``truncations`` cover the agents live before and
    after the step; an agent that left without a flag is reported as terminated.

    Raises:
        TypeError: ``env`` is not a ``MultiAgentEnv``.
        ImportError: pettingzoo is not installed (``pip install areal-agents[dev]``).
    """
    from .adapters_pettingzoo import PettingZooAdapter

    return PettingZooAdapter(env)
