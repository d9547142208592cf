"""Recorded sessions: every completion delivered to a session's key, token by token; the
gateway's ledger of sessions; and the bounded memory of ended ones."""

from __future__ import annotations

import html
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..ids import new_id
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
        turns: recorded completions, in order (only completions delivered to the client; a
            request the client gave up on is counted in ``SessionLedger.abandoned`` instead).
        rewards: rewards posted to the session, in order; their sum is the session's reward.
        turn_rewards: turn index -> the sum of the rewards posted for that turn (those are in
            ``rewards`` too).
        ended: whether ``POST /rl/sessions/{id}/end`` (or ``end()``) was called; an ended
            session rejects new completions.
        single_turn: the client's promise of one completion only (a single-turn episode): its
            requests go to the engine as ``last_turn``, which then keeps nothing for reuse by
            a follow-up (same tokens and log-probs; a later request works, without reuse).
    """

    policy: str
    metadata: dict[str, Any] = field(default_factory=dict)
    session_id: str = field(default_factory=lambda: f"sess_{new_id()}")
    turns: list[Turn] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    turn_rewards: dict[int, float] = field(default_factory=dict)
    ended: bool = False
    single_turn: bool = False
    created: float = field(default_factory=time.time)
    last_active: float | None = None
    """the gateway clock's reading at the session's last request (None: not yet seen; see
    ``idle_sessions``)."""
    index: dict[str, list[int]] = field(default_factory=dict, repr=False)
    """conversation key of (messages + reply) -> turn indices (see ``tokenization``)."""
    on_end: Callable[[Session], None] | None = field(default=None, repr=False, compare=False)
    """called once by ``end()`` (the gateway releases the session's replica stickiness)."""

    @property
    def reward(self) -> float:
        """Sum of the posted rewards (0.0 when none)."""
        return float(sum(self.rewards))

    def _repr_html_(self) -> str:
        """A table of the recorded turns for notebooks (every client-given text escaped)."""
        rows = "".join(
            f"<tr><td>{i}</td><td>{len(t.prompt_ids)}</td><td>{len(t.completion_ids)}</td>"
            f"<td>{min(t.versions, default='-')}..{max(t.versions, default='-')}</td>"
            f"<td>{html.escape(t.finish_reason)}</td>"
            f"<td>{html.escape(str((t.reply or {}).get('content', '')))}</td></tr>"
            for i, t in enumerate(self.turns))
        return (f"<div><b>Session</b> {html.escape(self.session_id)} policy="
                f"{html.escape(self.policy)} reward={self.reward:.3g} ended={self.ended}"
                "<table><tr><th>turn</th><th>prompt ids</th><th>completion ids</th>"
                f"<th>versions</th><th>finish</th><th>reply</th></tr>{rows}</table></div>")

    def record(self, turn: Turn) -> None:
        """Append a turn and index it for prefix matching."""
        from .tokenization import index_turn

        self.turns.append(turn)
        index_turn(self.index, self.turns, len(self.turns) - 1)

    def find_turn(self, completion_id: str, choice: int = 0) -> int:
        """The index of the turn recorded for choice ``choice`` of response ``completion_id``
        (the ``id`` of a chat or text completion).

        Raises:
            KeyError: no such turn in this session.
        """
        for i, turn in enumerate(self.turns):
            if turn.request_id == completion_id and turn.choice == choice:
                return i
        raise KeyError(f"session {self.session_id} has no turn for completion "
                       f"{completion_id!r} choice {choice}")

    def add_reward(self, value: float, turn: int | None = None) -> None:
        """Post a reward to the session, or to one of its turns.

        Raises:
            ValueError: ``value`` is NaN or infinite.
            IndexError: ``turn`` names no recorded turn.
        """
        if not math.isfinite(value):
            raise ValueError(f"a reward must be a finite number, got {value!r}")
        if turn is not None:
            if not 0 <= turn < len(self.turns):
                raise IndexError(f"session {self.session_id} has {len(self.turns)} turn(s) "
                                 f"(0..{len(self.turns) - 1}); there is no turn {turn}")
            self.turn_rewards[turn] = self.turn_rewards.get(turn, 0.0) + float(value)
        self.rewards.append(float(value))

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
                      turn_rewards={int(k): float(v) for k, v in
                                    (data.get("turn_rewards") or {}).items()},
                      ended=bool(data.get("ended")), created=float(data.get("created", 0.0)))
        for t in data.get("turns") or []:
            session.record(Turn(**t))
        return session

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (the body of ``GET /rl/sessions/{id}``)."""
        return {
            "session_id": self.session_id, "policy": self.policy, "metadata": self.metadata,
            "turns": [t.to_dict() for t in self.turns], "rewards": list(self.rewards),
            "turn_rewards": {str(k): v for k, v in sorted(self.turn_rewards.items())},
            "ended": self.ended, "created": self.created,
        }


def idle_sessions(sessions: dict[str, Session], now: float, timeout: float) -> list[Session]:
    """The open sessions of ``sessions`` no request used for more than ``timeout`` seconds
    (by the clock that gave ``now``); a session never seen before starts its idle time now.

    Example:
        >>> s = Session(policy="p")
        >>> idle_sessions({s.session_id: s}, now=10.0, timeout=5.0), s.last_active
        ([], 10.0)
        >>> [x is s for x in idle_sessions({s.session_id: s}, now=15.5, timeout=5.0)]
        [True]
    """
    out = []
    for session in sessions.values():
        if session.last_active is None:
            session.last_active = now
        elif not session.ended and now - session.last_active > timeout:
            out.append(session)
    return out


@dataclass
class SessionLedger:
    """What happened to a gateway's sessions, as counts (no session data: bounded memory).

    Attributes:
        opened: sessions opened.
        ended: sessions ended (over HTTP or in process).
        abandoned: completion requests the client gave up on (disconnect, timeout) before the
            completion was delivered; they are never recorded, so never trained on.
        expired: sessions ended by the gateway because no request used them for
            ``session_idle_timeout_s`` (their keys then answer 409; a trainer counts them
            abandoned).
    """

    opened: int = 0
    ended: int = 0
    abandoned: int = 0
    expired: int = 0

    def to_dict(self) -> dict[str, int]:
        """The counts as a JSON object."""
        return asdict(self)


class EndedSessions:
    """The ids and key digests of the last ``capacity`` sessions ended over HTTP.

    A late call with an ended session's key or id then answers 409 "session has ended"
    instead of 401/404, while memory stays bounded (about 300 bytes per remembered session).
    """

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._digests: OrderedDict[str, list[str]] = OrderedDict()  # session id -> digests
        self.by_digest: dict[str, str] = {}  # key digest -> session id

    def add(self, session_id: str, digests: list[str]) -> None:
        """Remember ``session_id`` (and its key digests), forgetting the oldest beyond capacity."""
        if self.capacity == 0:
            return
        self._digests[session_id] = list(digests)
        for d in digests:
            self.by_digest[d] = session_id
        while len(self._digests) > self.capacity:
            old_id, old = self._digests.popitem(last=False)
            for d in old:  # a refreshed key may name a later ended session by now
                if self.by_digest.get(d) == old_id:
                    del self.by_digest[d]

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._digests

    def __len__(self) -> int:
        return len(self._digests)
