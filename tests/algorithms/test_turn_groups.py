"""Credit groups: turn-level (``group_by="turn"``, per (task, role, turn)) and per episode
(``group_by="episode"``, per (task, policy, episode): the K judge verdicts on one answer)."""

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
    assert resolve("rloo", group_by="episode").group_by == "episode"
    with pytest.raises(ValueError, match=r"GRPO.group_by='seat'; choose one of \('role', "
                                         r"'turn', 'episode'\)"):
        GRPO(group_by="seat")
    with pytest.raises(ValueError, match="choose one of"):
        credit_group_ids(SAMPLES, "seat")  # type: ignore[arg-type]


def verdict(reward: float, episode: str, seat: str, group: str = "1",
            policy: str = "judge") -> Sample:
    return Sample([1, 2], [0, 1], [0.0, -1.0], [-1, 0], reward=reward, group=group,
                  agent=seat, policy=policy, meta={"episode": episode, "turns": [1]})


SEATS = ("judge", "judge_1", "judge_2")
# two episodes (answers) of task 1, K=3 verdicts each, interleaved the way a batch mixes them
VERDICTS = [verdict(r, e, s) for (e, r), s in zip(
    (("a", 1.0), ("b", 0.0), ("a", 1.0), ("b", 0.0), ("a", 0.0), ("b", 1.0)),
    (SEATS[0], SEATS[0], SEATS[1], SEATS[1], SEATS[2], SEATS[2]), strict=True)]


def test_episode_grouping_groups_exactly_the_k_verdicts_of_one_episode():
    assert credit_group_ids(VERDICTS, "episode").tolist() == [0, 1, 0, 1, 0, 1]
    # role grouping keys by seat: three groups that each mix the two answers
    assert credit_group_ids(VERDICTS, "role").tolist() == [0, 0, 1, 1, 2, 2]
    # per answer: a {1, 1, 0} mean 2/3, b {0, 0, 1} mean 1/3
    adv = GRPO(std_normalize=False, group_by="episode").advantages(VERDICTS)
    assert adv == pytest.approx([1 / 3, -1 / 3, 1 / 3, -1 / 3, -2 / 3, 2 / 3])
    # RLOO: reward minus the mean of the other K-1 verdicts on the same answer
    loo = RLOO(group_by="episode").advantages(VERDICTS)
    assert loo == pytest.approx([0.5, -0.5, 0.5, -0.5, -1.0, 1.0])
    # an answer all K verdicts agree on gives no signal
    same = [verdict(1.0, "c", s) for s in SEATS]
    assert GRPO(group_by="episode").advantages(same) == pytest.approx([0.0, 0.0, 0.0])


def test_episode_groups_stay_apart_per_task_and_policy_and_need_the_episode_id():
    s = [verdict(1.0, "a", "judge"), verdict(0.0, "a", "judge_1", group="2"),
         verdict(0.0, "a", "solver", policy="solver"), verdict(1.0, "a", "judge_1"),
         verdict(0.0, "z", "judge")]
    assert credit_group_ids(s, "episode").tolist() == [0, 1, 2, 0, 3]
    bare = Sample([1], [1], [0.0], [0], reward=0.0, agent="judge", group="1")
    with pytest.raises(ValueError, match=r"no meta\['episode'\]"):
        credit_group_ids([bare], "episode")
    assert credit_group_ids([bare], "role").tolist() == [0]  # other groupings do not need it
