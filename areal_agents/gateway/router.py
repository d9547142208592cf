"""Routing a policy's requests to its engine replicas: sticky per session, else least loaded;
a replica marked dead takes no requests until it is revived."""

from __future__ import annotations

from collections.abc import Sequence

from ..engines.base import InferenceEngine
from ..errors import EngineUnavailable


class Router:
    """Chooses one of a policy's engine replicas for each request.

    A session's first request goes to the replica with the least load (the engine's
    ``num_pending`` plus requests this router has in flight on it; ties go to the replica with
    the fewest sessions pinned to it); later requests of the same session go to the same
    replica so its prefix cache can be reused. A replica marked dead (``mark_dead``: its
    server died) is skipped and its sessions are routed afresh; ``revive`` or ``add`` (a
    late replica) make one routable.

    Args:
        engines: the replicas (at least one).

    Raises:
        ValueError: ``engines`` is empty.
        EngineUnavailable: (``pick``) every replica is dead.
    """

    def __init__(self, engines: Sequence[InferenceEngine]) -> None:
        if not engines:
            raise ValueError("a policy needs at least one engine replica; got an empty list")
        self.engines = list(engines)
        self._inflight = [0] * len(self.engines)
        self._sticky: dict[str, int] = {}
        self._pinned = [0] * len(self.engines)
        self.dead: set[int] = set()

    def load(self, index: int) -> int:
        """Current load of replica ``index``."""
        return self._inflight[index] + int(self.engines[index].num_pending)

    def pick(self, session_id: str | None = None) -> int:
        """Index of the replica for a request of ``session_id`` (None: no stickiness)."""
        if session_id is not None and session_id in self._sticky:
            return self._sticky[session_id]
        live = [i for i in range(len(self.engines)) if i not in self.dead]
        if not live:
            raise EngineUnavailable(f"all {len(self.engines)} engine replicas of this policy "
                                    "are dead (their servers exited); see their logs")
        # one live replica: it is the pick (no need to count every replica's pending rows)
        index = live[0] if len(live) == 1 else min(
            live, key=lambda i: (self.load(i), self._pinned[i]))
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

    def mark_dead(self, index: int) -> None:
        """Take replica ``index`` out of routing; its sessions are routed afresh."""
        self.dead.add(index)
        for session_id in [s for s, i in self._sticky.items() if i == index]:
            self.forget(session_id)

    def revive(self, index: int) -> None:
        """Route to replica ``index`` again."""
        self.dead.discard(index)

    def add(self, engine: InferenceEngine) -> int:
        """Append a replica (routable at once); returns its index."""
        self.engines.append(engine)
        self._inflight.append(0)
        self._pinned.append(0)
        return len(self.engines) - 1

    def live_engines(self) -> list[InferenceEngine]:
        """The replicas not marked dead."""
        return [e for i, e in enumerate(self.engines) if i not in self.dead]
