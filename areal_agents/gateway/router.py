"""Routing a policy's requests to its engine replicas: sticky per session, else least loaded."""

from __future__ import annotations

from collections.abc import Sequence

from ..engines.base import InferenceEngine


class Router:
    """Chooses one of a policy's engine replicas for each request.

    A session's first request goes to the replica with the least load (the engine's
    ``num_pending`` plus requests this router has in flight on it; ties go to the replica with
    the fewest sessions pinned to it); later requests of the same session go to the same
    replica so its prefix cache can be reused.

    Args:
        engines: the replicas (at least one).

    Raises:
        ValueError: ``engines`` is empty.
    """

    def __init__(self, engines: Sequence[InferenceEngine]) -> None:
        if not engines:
            raise ValueError("a policy needs at least one engine replica; got an empty list")
        self.engines = list(engines)
        self._inflight = [0] * len(self.engines)
        self._sticky: dict[str, int] = {}
        self._pinned = [0] * len(self.engines)

    def load(self, index: int) -> int:
        """Current load of replica ``index``."""
        return self._inflight[index] + int(self.engines[index].num_pending)

    def pick(self, session_id: str | None = None) -> int:
        """Index of the replica for a request of ``session_id`` (None: no stickiness)."""
        if session_id is not None and session_id in self._sticky:
            return self._sticky[session_id]
        index = min(range(len(self.engines)), key=lambda i: (self.load(i), self._pinned[i]))
        if session_id is not None:
            self._sticky[session_id] = index
            self._pinned[index] += 1
        return index

    def acquire(self, session_id: str | None = None) -> tuple[int, InferenceEngine]:
        """Pick a replica and count one request in flight on it (pair with ``release``)."""
        index = self.pick(session_id)
        self._inflight[index] += 1
        return index, self.engines[index]

    def release(self, index: int) -> None:
        """Mark one request on replica ``index`` finished."""
        self._inflight[index] -= 1

    def forget(self, session_id: str) -> None:
        """Drop a session's stickiness (when it ends)."""
        index = self._sticky.pop(session_id, None)
        if index is not None:
            self._pinned[index] -= 1
