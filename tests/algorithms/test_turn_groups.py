"""Turn-level credit groups (``group_by="turn"``): advantages per (task, role, turn)."""

from __future__ import annotations

import pytest

from areal_agents.algorithms import GRPO, RLOO, resolve
from areal_agents.algorithms.turn_groups import credit_group_ids, turn_of
from areal_agents.samples import Sample


def sample(reward: float, turn: int, group: str = "1", agent: str = "x") -> Sample:
    return Sample([1, 2], [0, 1], [0.0, -1.0], [-1, 0], reward=reward, group=group,
                  agent=agent, meta={"turns": [turn]})


# two episodes of one task: role x acts at turns 0 and 2 in each
SAMPLES = [sample(1.0, 0), sample(3.0, 2), sample(0.0, 0), sample(0.0, 2)]


def test_role_grouping_mixes_turns_and_turn_grouping_does_not():
    # role: one group {1, 3, 0, 0}, mean 1, unbiased std sqrt(2)
    role = GRPO(std_normalize=False).advantages(SAMPLES)
    assert role == pytest.approx([0.0, 2.0, -1.0, -1.0])
    # turn: {1, 0} at turn 0 (mean 0.5) and {3, 0} at turn 2 (mean 1.5)
    turn = GRPO(std_normalize=False, group_by="turn").advantages(SAMPLES)
    assert turn == pytest.approx([0.5, 1.5, -0.5, -1.5])
    normalised = GRPO(group_by="turn").advantages(SAMPLES)  # std 0.7071 and 2.1213
    assert normalised == pytest.approx([0.70710, 0.70710, -0.70710, -0.70710], abs=1e-4)
    assert RLOO(group_by="turn").advantages(SAMPLES) == pytest.approx([1.0, 3.0, -1.0, -3.0])


def test_turn_groups_stay_apart_per_task_and_role():
    s = [sample(1.0, 0, "1", "x"), sample(0.0, 0, "1", "y"), sample(2.0, 0, "2", "x"),
         sample(4.0, 0, "1", "x"), sample(5.0, 1, "1", "x")]
    assert credit_group_ids(s, "turn").tolist() == [0, 1, 2, 0, 3]
    assert credit_group_ids(s, "role").tolist() == [0, 1, 2, 0, 0]
    merged = Sample([1], [1], [0.0], [0], reward=0.0, meta={"turns": [3, 4, 5]})
    assert turn_of(merged) == 3 and turn_of(Sample([1], [1], [0.0], [0], reward=0.0)) == 0


def test_group_by_is_an_algorithm_param_and_is_validated():
    assert resolve("grpo", group_by="turn").group_by == "turn"
    with pytest.raises(ValueError, match=r"GRPO.group_by='episode'; choose one of \('role', "
                                         r"'turn'\)"):
        GRPO(group_by="episode")
