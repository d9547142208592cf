"""Per-step episode metrics describe the groups resolved by that step, not arrival order."""

from __future__ import annotations

from areal_agents.trainers.episodes import EpisodeStats
from areal_agents.trainers.stats import StepStats


def episode(seed, reward):
    return EpisodeStats(seed=seed, returns={"a": reward}, success={"a": float(reward > 0)},
                        length=2, status="done", policy_of={"a": "p"}, gen_lengths={"a": [3]})


def test_episodes_of_pending_groups_wait_for_their_step():
    stats = StepStats()
    for seed, reward in ((0, 1.0), (0, 0.0), (1, 1.0), (2, 5.0)):  # seed 2: next step's group
        stats.add_episode(episode(seed, reward))
    step1 = stats.episode_metrics(pending={2})
    assert step1["train/a/reward"] == 2 / 3 and step1["train/episodes"] == 3
    assert step1["train/a/gen_len"] == 3.0 and step1["perf/episodes_total"] == 3
    stats.add_episode(episode(2, 1.0))
    step2 = stats.episode_metrics(pending=set())
    assert step2["train/a/reward"] == 3.0 and step2["train/episodes"] == 2
    assert "train/a/reward" not in stats.episode_metrics()  # nothing left
