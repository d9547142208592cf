"""PrisonersDilemma with two policies against a pool (``seat="any"``) under ``clock="lockstep"``:
each episode trains only one policy, so one policy's batch can starve while the other's
staleness budget is full. The run must stop with ``Deadlocked`` (naming the fix), not hang."""

from __future__ import annotations

import asyncio
import gc

import pytest

from areal_agents.league import OpponentPool
from areal_agents.rollout.controller import Deadlocked
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

ONE_TOKEN = {"temperature": 1.0, "max_tokens": 1}


async def test_pd_pool_any_seat_under_lockstep_raises_deadlocked():
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    trainer = Trainer(
        env="PrisonersDilemma-v0", env_kwargs={"rounds": 1},
        policies={p: Policy(seed=i, api="completions", sampling=dict(ONE_TOKEN))
                  for i, p in enumerate(("p0", "p1"))},
        policy_map={"player_0": "p0", "player_1": "p1"},
        opponents=OpponentPool(members=["always_defect"], seat="any"),
        batch_size=2, group_size=2, clock="lockstep", progress=False, seed=0)
    try:
        with pytest.raises(Deadlocked, match=r"policy 'p[01]' waits for a batch but no episode "
                           r"can be admitted .* use clock='independent'"):
            await asyncio.wait_for(trainer.afit(40), 300)  # a hang guard, not a threshold
    finally:
        await trainer.aclose()
        for _ in range(3):
            await asyncio.sleep(0.1)  # let every task the failure left behind end
        gc.collect()
        loop.set_exception_handler(None)
    # no other policy's step was left running into the teardown (nothing logged as "Task
    # exception was never retrieved" / "Task was destroyed but it is pending")
    assert [c["message"] for c in unhandled] == []
