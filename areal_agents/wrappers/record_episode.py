"""``RecordEpisode``: keep each agent's message transcript and rewards."""

from __future__ import annotations

from typing import Any

from ..env import MultiAgentEnv
from ..messages import Message
from .base import MultiAgentWrapper, Wrapper


def as_messages(obs: Any) -> list[Message]:
    """Render an observation as chat messages: a message list is copied, a message dict is
    wrapped in a list, anything else becomes one user message holding ``str(obs)``."""
    if isinstance(obs, list) and all(isinstance(m, dict) and "role" in m for m in obs):
        return [dict(m) for m in obs]  # type: ignore[misc]
    if isinstance(obs, dict) and "role" in obs:
        return [dict(obs)]  # type: ignore[list-item]
    return [{"role": "user", "content": str(obs)}]


def action_message(action: Any) -> Message:
    """The assistant message of an action (``parse_action``), or its ``str`` if it does not parse."""
    from ..messages import parse_action

    try:
        return parse_action(action)
    except (TypeError, ValueError):
        return {"role": "assistant", "content": str(action)}


class _Recorder:
    def _start(self) -> None:
        if any(self.transcripts.values()) or any(self.rewards.values()):
            self.history.append({"transcripts": self.transcripts, "rewards": self.rewards})
            if self.max_history is not None:
                del self.history[: max(0, len(self.history) - self.max_history)]
        self.transcripts: dict[str, list[Message]] = {}
        self.rewards: dict[str, list[float]] = {}

    def _obs(self, agent: str, obs: Any) -> None:
        self.transcripts.setdefault(agent, []).extend(as_messages(obs))

    def _act(self, agent: str, action: Any) -> None:
        self.transcripts.setdefault(agent, []).append(action_message(action))

    def _reward(self, agent: str, reward: float) -> None:
        self.rewards.setdefault(agent, []).append(float(reward))


class RecordEpisode(_Recorder, Wrapper):
    """Record the transcript (observations and actions as messages) and rewards per agent.

    Attributes:
        transcripts: ``{agent_id: [messages]}`` of the current episode (single-agent envs use
            the id ``"agent"``); observations and actions interleaved in order.
        rewards: ``{agent_id: [reward per step that rewarded it]}``.
        history: finished episodes as ``{"transcripts", "rewards"}`` dicts, oldest first
            (at most ``max_history``; ``None`` keeps all).

    ``RecordEpisode(multi_agent_env)`` returns a ``MultiAgentRecordEpisode``.
    """

    def __new__(cls, env: Any = None, *args: Any, **kwargs: Any) -> Any:
        if cls is RecordEpisode and isinstance(env, MultiAgentEnv):
            return MultiAgentRecordEpisode(env, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, env: Any, max_history: int | None = 100) -> None:
        super().__init__(env)
        self.max_history = max_history
        self.history: list[dict[str, Any]] = []
        self.transcripts, self.rewards = {}, {}

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        obs, info = await self.env.reset(seed=seed, options=options)
        self._start()
        self._obs("agent", obs)
        return obs, info

    async def step(self, action: Any) -> Any:
        result = await self.env.step(action)
        self._act("agent", action)
        self._reward("agent", result[1])
        self._obs("agent", result[0])
        return result


class MultiAgentRecordEpisode(_Recorder, MultiAgentWrapper):
    """``RecordEpisode`` for a ``MultiAgentEnv`` (see ``RecordEpisode``)."""

    def __init__(self, env: MultiAgentEnv, max_history: int | None = 100) -> None:
        super().__init__(env)
        self.max_history = max_history
        self.history: list[dict[str, Any]] = []
        self.transcripts, self.rewards = {}, {}

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        obs, infos = await self.env.reset(seed=seed, options=options)
        self._start()
        for agent, o in obs.items():
            self._obs(agent, o)
        return obs, infos

    async def step(self, actions: Any) -> Any:
        obs, rewards, terms, truncs, infos = await self.env.step(actions)
        for agent, action in actions.items():
            self._act(agent, action)
        for agent, r in rewards.items():
            self._reward(agent, r)
        for agent, o in obs.items():
            self._obs(agent, o)
        return obs, rewards, terms, truncs, infos
