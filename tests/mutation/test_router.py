"""Dead replicas in the router (mark_dead / revive / add / live_engines): survivors and
untested functions of the router mutation run."""

from __future__ import annotations

import pytest

from areal_agents.errors import EngineUnavailable
from areal_agents.gateway.router import Router
from areal_agents.testing.engine import ScriptedEngine


def test_a_dead_replica_is_skipped_and_its_sessions_are_routed_afresh():
    engines = [ScriptedEngine(), ScriptedEngine(), ScriptedEngine()]
    router = Router(engines)
    assert [router.pick(s) for s in ("a", "b", "c")] == [0, 1, 2]
    router.mark_dead(1)
    assert router.dead == {1}
    assert router.live_engines() == [engines[0], engines[2]]
    assert router.pick("a") == 0  # still pinned to a live replica
    assert router.pick("b") == 0  # routed afresh: 0 and 2 both have one pinned session
    assert router.pick(None) == 2  # 0 has two pinned sessions now, 2 has one
    router.revive(1)
    assert router.dead == set() and router.live_engines() == engines
    assert router.pick("d") == 1  # the revived replica has no sessions


def test_every_replica_dead_raises_and_a_late_replica_is_routable_at_once():
    router = Router([ScriptedEngine(), ScriptedEngine()])
    router.mark_dead(0)
    router.mark_dead(1)
    with pytest.raises(EngineUnavailable) as info:
        router.pick("s")
    assert str(info.value) == ("all 2 engine replicas of this policy are dead (their servers "
                               "exited); see their logs")
    late = ScriptedEngine()
    assert router.add(late) == 2
    assert router.acquire("s") == (2, late)
    assert (router.load(2), router.live_engines()) == (1, [late])
    router.release(2)
    assert router.load(2) == 0


def test_revive_of_a_live_replica_is_a_no_op_and_pins_are_counted_per_replica():
    router = Router([ScriptedEngine(), ScriptedEngine()])
    router.revive(0)
    assert router.dead == set()
    assert [router.pick(s) for s in ("a", "b", "c")] == [0, 1, 0]
    router.mark_dead(0)  # a and c lose their pins: replica 1 keeps only b
    assert [router.pick(s) for s in ("a", "c")] == [1, 1]


def test_a_late_replica_starts_with_no_pinned_sessions():
    router = Router([ScriptedEngine()])
    assert router.pick("a") == 0
    assert router.add(ScriptedEngine()) == 1
    assert router.pick("b") == 1  # equal load: the replica without pinned sessions wins
