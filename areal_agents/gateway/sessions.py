"""Recorded sessions: every completion made with a session's key, token by token."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..samples import Sample, SamplingDistribution


@dataclass
class Turn:
    """One recorded completion (one choice of one request).

    Attributes:
        prompt_ids: the exact prompt ids the engine saw.
        completion_ids: the ids the engine generated (stop token included).
        logprobs: behaviour log-prob per completion id.
        versions: weight version per completion id.
        messages: the request's messages (None for ``/v1/completions``).
        reply: the assistant message returned for this choice (None for completions).
        tools: the request's tools.
        finish_reason: the engine's finish reason.
        request_id: the request's id; ``choice`` the choice index (n > 1 shares a request).
        prefix_turn: index of the turn whose prompt+completion this prompt extends (None when
            the prompt was tokenized from scratch).
        timing: ``{"start", "end", "latency"}`` wall-clock seconds.
        sampling: the request's temperature/top-k/top-p, which define ``logprobs``.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    messages: list[dict[str, Any]] | None
    reply: dict[str, Any] | None
    tools: list[dict[str, Any]] | None
    finish_reason: str
    request_id: str
    choice: int = 0
    prefix_turn: int | None = None
    timing: dict[str, float] = field(default_factory=dict)
    sampling: SamplingDistribution = field(default_factory=SamplingDistribution)

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):  # from ``to_dict()`` / JSON
            self.sampling = SamplingDistribution(**self.sampling)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


@dataclass
class Session:
    """A recorded session of one agent in one episode.

    Attributes:
        session_id: the public id (used in ``/rl/sessions/{id}`` paths).
        policy: the policy (model) the session was opened for.
        metadata: free-form client data given at creation.
        turns: recorded completions, in order.
        rewards: rewards posted to the session, in order.
        ended: whether ``POST /rl/sessions/{id}/end`` (or ``end()``) was called; an ended
            session rejects new completions.
    """

    policy: str
    metadata: dict[str, Any] = field(default_factory=dict)
    session_id: str = field(default_factory=lambda: f"sess_{uuid.uuid4().hex}")
    turns: list[Turn] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    ended: bool = False
    created: float = field(default_factory=time.time)
    index: dict[str, list[int]] = field(default_factory=dict, repr=False)
    """conversation key of (messages + reply) -> turn indices (see ``tokenization``)."""
    on_end: Callable[[Session], None] | None = field(default=None, repr=False, compare=False)
    """called once by ``end()`` (the gateway releases the session's replica stickiness)."""

    @property
    def reward(self) -> float:
        """Sum of the posted rewards (0.0 when none)."""
        return float(sum(self.rewards))

    def record(self, turn: Turn) -> None:
        """Append a turn and index it for prefix matching."""
        from .tokenization import index_turn

        self.turns.append(turn)
        index_turn(self.index, self.turns, len(self.turns) - 1)

    def end(self) -> None:
        """Mark the session ended (it rejects new completions). Idempotent."""
        if not self.ended and self.on_end is not None:
            self.on_end(self)
        self.ended = True

    def to_samples(self, reward: float | None = None, agent: str = "", group: str = "",
                   ) -> tuple[list[Sample], Any]:
        """Training samples of this session by the tokenization contract.

        Args:
            reward: the samples' reward (default: the sum of posted rewards).
            agent: the agent id written into each sample.
            group: the group key written into each sample.

        Returns:
            ``(samples, report)``: see ``tokenization.turns_to_samples``.
        """
        from .tokenization import turns_to_samples

        return turns_to_samples(
            self.turns, reward=self.reward if reward is None else reward, agent=agent,
            policy=self.policy, group=group, meta={"session_id": self.session_id})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Session:
        """Rebuild a session from ``to_dict()`` output (e.g. ``GET /rl/sessions/{id}``)."""
        session = cls(policy=data["policy"], metadata=dict(data.get("metadata") or {}),
                      session_id=data["session_id"], rewards=list(data.get("rewards") or []),
                      ended=bool(data.get("ended")), created=float(data.get("created", 0.0)))
        for t in data.get("turns") or []:
            session.record(Turn(**t))
        return session

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (the body of ``GET /rl/sessions/{id}``)."""
        return {
            "session_id": self.session_id, "policy": self.policy, "metadata": self.metadata,
            "turns": [t.to_dict() for t in self.turns], "rewards": list(self.rewards),
            "ended": self.ended, "created": self.created,
        }
