"""The agent contract: anything that turns an observation into an action."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .samples import Sample


class Agent:
    """A policy acting in an env: LLM-backed, scripted, random or human.

    Subclasses implement ``act``; ``reset`` clears per-episode state (chat history).
    ``end_episode`` is called once by ``run_episode`` when the episode ends and returns the
    token-level training samples the agent recorded (LLM agents behind a gateway session);
    agents that do not train return ``[]``.
    """

    async def act(self, observation: Any) -> Any:
        """Return an action (assistant message dict or str) for ``observation``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the current episode (called before each episode)."""

    async def end_episode(self, episode_return: float) -> list[Sample]:
        """Finish the episode; return recorded training samples (``[]`` if none)."""
        return []
