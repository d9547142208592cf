"""Least-loaded, sticky routing over replicas."""

from __future__ import annotations

import pytest

from areal_agents.gateway.router import Router
from areal_agents.testing.engine import ScriptedEngine


def test_least_loaded_then_sticky():
    engines = [ScriptedEngine() for _ in range(3)]
    router = Router(engines)
    i0, _ = router.acquire("s0")
    i1, _ = router.acquire("s1")
    i2, _ = router.acquire("s2")
    assert sorted([i0, i1, i2]) == [0, 1, 2]  # spread over idle replicas
    assert router.acquire("s1")[0] == i1  # sticky even though i1 is now busier
    router.release(i0)
    assert router.pick(None) == i0  # least loaded
    engines[i0]._pending = 5  # the engine's own queue counts too
    assert router.pick(None) != i0
    router.forget("s1")
    assert "s1" not in router._sticky


def test_empty_router_rejected():
    with pytest.raises(ValueError, match="at least one engine"):
        Router([])
