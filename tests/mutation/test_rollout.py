"""Rollout-state details the mutation run found untested: restoring staleness counters and
the controller's cursor, ledger and cancelled episodes from a saved state; the behaviour is
tested in tests/trainer/test_controller.py and test_staleness.py."""

from __future__ import annotations

from collections import Counter

from areal_agents.rollout.controller import RolloutController
from areal_agents.rollout.staleness import StalenessControl


async def never(*args, **kwargs):  # the controller never runs an episode here
    raise AssertionError("no episode expected")


def test_staleness_load_state_dict_restores_counts_and_rebases():
    saved = StalenessControl(4, max_staleness=1, version=3, running=2, waiting=5, accepted=20,
                             submitted=21, filtered=2, failed=1, paused=True, overshoot=3,
                             consumed=7).state_dict()
    control = StalenessControl(4, max_staleness=1)
    control.load_state_dict(saved)
    assert control.state_dict() == {
        "batch_size": 4, "max_staleness": 1, "max_concurrent": 64, "version": 3, "running": 0,
        "waiting": 0, "accepted": 12, "submitted": 21, "filtered": 2, "failed": 1,
        "paused": False, "overshoot": 0, "consumed": 0}
    fresh = StalenessControl(2)
    fresh.load_state_dict({"version": 1})  # counts missing from an older state mean 0
    assert (fresh.submitted, fresh.filtered, fresh.failed, fresh.accepted) == (0, 0, 0, 2)
    fresh.rebase(5, trained_episodes=7)
    assert (fresh.version, fresh.accepted) == (5, 7)


def controller() -> RolloutController:
    controls = {"a": StalenessControl(2), "b": StalenessControl(2)}
    return RolloutController(never, controls, group_size=2, seed=0)


def test_controller_load_state_dict():
    ctl = controller()
    ctl.pending[99] = {"a"}
    state = {"cursor": 4, "done": [6, 5],
             "ledger": {"a": {"trained": 6}, "ghost": {"trained": 1}},
             "controls": {"a": {"version": 2, "submitted": 9},
                          "b": {"version": 1, "submitted": 2}, "ghost": {"version": 7}},
             "unresolved": {"a": 3, "b": 0}}
    ctl.load_state_dict(state)
    assert (ctl.next_seed, ctl.skip, ctl.pending) == (4, {5, 6}, {})
    assert ctl.ledger["a"] == Counter({"trained": 6, "cancelled_by_restart": 3})
    assert ctl.ledger["b"] == Counter()
    assert "ghost" not in ctl.ledger and "ghost" not in ctl.controls
    assert (ctl.controls["a"].version, ctl.controls["a"].submitted) == (2, 9)
    assert ctl.controls["b"].version == 1


def test_controller_state_without_unresolved_counts_the_missing_episodes():
    ctl = controller()
    ctl.load_state_dict({"cursor": 0, "done": [],
                         "ledger": {"a": {"trained": 6, "filtered": 1}},
                         "controls": {"a": {"version": 2, "submitted": 10},
                                      "b": {"version": 0, "submitted": 0}}})
    assert ctl.ledger["a"]["cancelled_by_restart"] == 3  # 10 submitted - 7 resolved
    assert "cancelled_by_restart" not in ctl.ledger["b"]


def test_controller_state_dict_round_trip():
    ctl = controller()
    ctl.next_seed = 8
    ctl.pending[5] = {"a"}
    ctl.ledger["a"]["trained"] = 4
    state = ctl.state_dict()
    assert (state["cursor"], state["done"]) == (5, [6, 7])
    assert state["ledger"] == {"a": {"trained": 4}, "b": {}}
    other = controller()
    other.load_state_dict(state)
    assert (other.next_seed, other.skip) == (5, {6, 7})
