"""Router picks where the answer is not replica 0 by default: in-flight counts, the order of
the pick key (load first, pinned sessions second) and pinned-session bookkeeping."""

from __future__ import annotations

import pytest

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


def test_in_flight_counts_add_up_per_replica():
    router = Router([QueuedEngine(), QueuedEngine()])
    for _ in range(3):
        assert router.acquire("s")[0] == 0  # sticky: all three on replica 0
    assert (router.load(0), router.load(1)) == (3, 0)
    router.release(0)
    assert router.load(0) == 2
    router.release(0)
    router.release(0)
    assert router.load(0) == 0


def test_pins_count_every_session_and_forget_removes_exactly_one():
    router = Router([QueuedEngine(), QueuedEngine()])
    assert [router.pick(s) for s in ("a", "b", "c", "d", "e")] == [0, 1, 0, 1, 0]
    router.forget("e")
    router.forget("c")  # pins now 1 and 2
    assert router.pick("f") == 0
    router.forget("b")
    router.forget("d")
    router.forget("a")
    router.forget("f")  # no pins left anywhere
    assert router.pick("g") == 0
    router.forget("g")
    assert router.pick("h") == 0


def test_forget_unpins_a_single_session():
    router = Router([QueuedEngine(), QueuedEngine()])
    assert (router.pick("a"), router.pick("b")) == (0, 1)
    router.forget("b")
    assert router.pick("c") == 1  # replica 1 has no pinned session left
    router.forget("never-seen")  # unknown sessions are ignored
    router.forget("b")  # already forgotten
    assert router.pick("d") == 0


def test_empty_router_message():
    with pytest.raises(ValueError) as info:
        Router([])
    assert str(info.value) == "a policy needs at least one engine replica; got an empty list"
