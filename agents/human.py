"""``HumanAgent``: a person typing actions on stdin."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from areal_agents.agent import Agent
from areal_agents.wrappers.record_episode import as_messages


class HumanAgent(Agent):
    """Shows each observation's messages and reads the action as one line of text.

    Args:
        input_fn: reads a line (default ``input``); run in a thread so the event loop keeps going.
        output_fn: shows text (default ``print``).
        name: shown in the prompt.
    """

    def __init__(
        self,
        input_fn: Callable[[str], str] = input,
        output_fn: Callable[[str], Any] = print,
        name: str = "you",
    ) -> None:
        self.input_fn = input_fn
        self.output_fn = output_fn
        self.name = name

    async def act(self, observation: Any) -> str:
        for msg in as_messages(observation):
            self.output_fn(f"[{msg['role']}] {msg.get('content')}")
        return await asyncio.to_thread(self.input_fn, f"{self.name}> ")
