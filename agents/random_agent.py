"""``RandomAgent``: picks uniformly among given actions."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from areal_agents.agent import Agent


class RandomAgent(Agent):
    """Acts uniformly at random.

    Args:
        actions: the action choices, or a callable ``actions(observation) -> choices`` (e.g.
            the legal moves of the current position).
        seed: seeds the agent's own ``random.Random`` (re-seeded by ``reset`` for repeatability).

    Raises:
        ValueError: (in ``act``) there are no actions to choose from.

    Example:
        >>> import asyncio
        >>> agent = RandomAgent(["rock", "paper"], seed=0)
        >>> asyncio.run(agent.act([])) in {"rock", "paper"}
        True
    """

    def __init__(
        self, actions: Sequence[Any] | Callable[[Any], Sequence[Any]], seed: int | None = None
    ) -> None:
        if not callable(actions):
            actions = list(actions)
            if not actions:
                raise ValueError("RandomAgent needs at least one action")
        self.actions = actions
        self.seed = seed
        self.rng = random.Random(seed)

    def reset(self) -> None:
        if self.seed is not None:
            self.rng = random.Random(self.seed)

    async def act(self, observation: Any) -> Any:
        choices = list(self.actions(observation)) if callable(self.actions) else self.actions
        if not choices:
            raise ValueError("RandomAgent: no actions to choose from for this observation")
        return self.rng.choice(choices)
