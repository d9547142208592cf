"""``ScriptedAgent``: acts through a given function of the observation."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from areal_agents.agent import Agent


class ScriptedAgent(Agent):
    """Acts with ``fn(observation) -> action``; ``fn`` may be sync or async.

    Example:
        >>> import asyncio
        >>> asyncio.run(ScriptedAgent(lambda obs: "42").act([]))
        '42'
    """

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"ScriptedAgent needs a callable fn(observation) -> action, got {fn!r}")
        self.fn = fn

    async def act(self, observation: Any) -> Any:
        action = self.fn(observation)
        if inspect.isawaitable(action):
            action = await action
        return action
