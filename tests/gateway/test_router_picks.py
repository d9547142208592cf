"""Router picks where the answer is not replica 0 by default: in-flight counts, the order of
the pick key (load first, pinned sessions second) and pinned-session bookkeeping."""

from __future__ import annotations

from areal_agents.gateway.router import Router
from areal_agents.testing.engine import ScriptedEngine


class QueuedEngine(ScriptedEngine):
    """A scripted engine whose own queue length (``num_pending``) a test sets directly."""

    def __init__(self, queued: int = 0) -> None:
        super().__init__()
        self.queued = queued

    @property
    def num_pending(self) -> int:
        return self.queued


def test_requests_in_flight_on_the_router_count_as_load():
    router = Router([QueuedEngine(), QueuedEngine()])
    assert router.acquire(None)[0] == 0
    assert router.load(0) == 1 and router.load(1) == 0
    assert router.acquire(None)[0] == 1  # replica 0 has one request in flight
    assert router.acquire(None)[0] == 0  # 1 vs 1: tie, no sessions pinned: lowest index
    router.release(0)
    router.release(0)
    assert router.pick(None) == 0  # 0 in flight on replica 0 again, 1 on replica 1


def test_load_outranks_pinned_sessions():
    engines = [QueuedEngine(), QueuedEngine()]
    router = Router(engines)
    index, _ = router.acquire("s0")
    router.release(index)
    assert index == 0
    engines[1].queued = 3
    # replica 0: load 0, one pinned session; replica 1: load 3, none pinned
    assert router.pick(None) == 0
    assert router.pick("s1") == 0


def test_pinned_sessions_break_load_ties_and_forget_unpins():
    router = Router([QueuedEngine(), QueuedEngine(), QueuedEngine()])
    assert [router.pick(s) for s in ("a", "b", "c")] == [0, 1, 2]  # all idle: spread by pins
    assert router.pick("d") == 0  # one pinned each: lowest index
    router.forget("b")
    assert router.pick("e") == 1  # replica 1 has no pinned session left
    router.forget("a")
    router.forget("d")
    assert router.pick("f") == 0
    router.forget("c")
    assert router.pick("b") == 2  # a forgotten session is routed afresh, not to its old replica


def test_sticky_session_ignores_load():
    engines = [QueuedEngine(), QueuedEngine()]
    router = Router(engines)
    assert router.pick("s") == 0
    engines[0].queued = 10
    assert router.pick("s") == 0
    assert router.pick(None) == 1
