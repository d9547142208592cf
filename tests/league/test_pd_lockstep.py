"""PrisonersDilemma with two policies against a pool (``seat="any"``) under ``clock="lockstep"``:
each episode trains only one policy, so one policy's batch can starve while the other's
staleness budget is full. The run must stop with ``Deadlocked`` (naming the fix), not hang."""

from __future__ import annotations

from areal_agents.league import OpponentPool
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer
from league._deadlock import assert_deadlocks

ONE_TOKEN = {"temperature": 1.0, "max_tokens": 1}


async def test_pd_pool_any_seat_under_lockstep_raises_deadlocked():
    trainer = Trainer(
        env="PrisonersDilemma-v0", env_kwargs={"rounds": 1},
        policies={p: Policy(seed=i, api="completions", sampling=dict(ONE_TOKEN))
                  for i, p in enumerate(("p0", "p1"))},
        policy_map={"player_0": "p0", "player_1": "p1"},
        opponents=OpponentPool(members=["always_defect"], seat="any"),
        batch_size=2, group_size=2, clock="lockstep", progress=False, seed=4)
    # seed 4's opponent draws starve p1 after one global step (seed 0 took four, ~5x the
    # time); no other policy's step is left running into the teardown
    await assert_deadlocks(trainer, 10, "p1")
