"""``OpponentPool`` is part of the flat API (``aa.OpponentPool``)."""

from __future__ import annotations

import areal_agents as aa
from areal_agents.league import OpponentPool


def test_opponent_pool_is_exported_flat():
    assert "OpponentPool" in aa.__all__
    assert aa.OpponentPool is OpponentPool
    pool = aa.OpponentPool(members=["heuristic"], snapshot_every=5)
    assert (pool.seat, pool.members, pool.snapshot_every) == ("any", ["heuristic"], 5)
