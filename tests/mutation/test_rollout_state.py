"""Controller state restore with keys missing (older states) and unknown policies listed
first: survivors of the rollout mutation run."""

from __future__ import annotations

from collections import Counter

from areal_agents.rollout.controller import RolloutController
from areal_agents.rollout.staleness import StalenessControl


async def never(*args, **kwargs):  # the controller never runs an episode here
    raise AssertionError("no episode expected")


def controller() -> RolloutController:
    controls = {"a": StalenessControl(2), "b": StalenessControl(2)}
    return RolloutController(never, controls, group_size=2, seed=0)


def test_state_without_ledger_and_controls_restores_the_cursor_only():
    ctl = controller()
    ctl.load_state_dict({"cursor": 3, "done": [4]})
    assert (ctl.next_seed, ctl.skip) == (3, {4})
    assert ctl.ledger["a"] == Counter() and ctl.controls["a"].version == 0


def test_unknown_policy_first_and_policy_missing_from_unresolved():
    ctl = controller()
    ctl.load_state_dict({
        "cursor": 0, "done": [],
        "ledger": {"a": {"trained": 2, "cancelled_by_restart": 2}},
        "controls": {"ghost": {"version": 9}, "a": {"version": 1, "submitted": 7},
                     "b": {"version": 2, "submitted": 4}},
        "unresolved": {"a": 3}})  # b has nothing unresolved
    assert ctl.ledger["a"] == Counter({"trained": 2, "cancelled_by_restart": 5})
    assert ctl.ledger["b"] == Counter()
    assert (ctl.controls["a"].version, ctl.controls["b"].version) == (1, 2)
