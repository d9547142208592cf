"""``RareRoleEnv``: two roles with a 1:k sample ratio (one role acts in one episode of k)."""

from __future__ import annotations

import asyncio
from typing import Any

from areal_agents.env import MultiAgentEnv
from areal_agents.messages import user
from areal_agents.wrappers.record_episode import action_message


class RareRoleEnv(MultiAgentEnv):
    """One-step episodes: ``"common"`` answers in every episode, ``"rare"`` only when
    ``seed % ratio == ratio - 1`` (so the first episodes hold no rare sample).

    Each answer starting with ``"A"`` earns 1.0, anything else 0.0: something to learn.

    Args:
        ratio: one episode in ``ratio`` asks the rare role (1: every episode asks both).
        gate: when given, an episode the rare role takes part in ends only once the event is
            set (a slow role: its samples arrive late).

    Example:
        >>> import asyncio
        >>> env = RareRoleEnv(ratio=4)
        >>> sorted(asyncio.run(env.reset(seed=3))[0]), sorted(asyncio.run(env.reset(seed=0))[0])
        (['common', 'rare'], ['common'])
    """

    possible_agents = ["common", "rare"]  # noqa: RUF012 - the base class's convention

    def __init__(self, ratio: int = 4, gate: asyncio.Event | None = None) -> None:
        if ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio}")
        self.ratio, self.gate = ratio, gate
        self.agents = []

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        await super().reset(seed=seed)
        rare = (seed or 0) % self.ratio == self.ratio - 1
        self.agents = ["common", "rare"] if rare else ["common"]
        return {a: [user(f"{a}: answer with a letter")] for a in self.agents}, {}

    async def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        if "rare" in actions and self.gate is not None:
            await self.gate.wait()
        rewards = {a: float((action_message(x).get("content") or "").startswith("A"))
                   for a, x in actions.items()}
        done = {a: True for a in actions}
        self.agents = []
        return {}, rewards, done, {a: False for a in actions}, {}

    def sample_action(self, agent: str | None = None) -> str:
        """A valid answer (``"A"``)."""
        return "A"
