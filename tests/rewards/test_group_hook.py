"""The group-level hook: ``RolloutController(group_fn=...)`` runs once per finished group, before
filtering, and ``RewardHooks.on_group`` puts each group reward on its own episode's samples."""

from __future__ import annotations

import asyncio
import random

from areal_agents.episode import Episode
from areal_agents.rewards.hooks import RewardHooks
from areal_agents.rollout import RolloutController, StalenessControl
from areal_agents.samples import Sample


def _sample(reward: float, member: int) -> Sample:
    return Sample([1, 2, 3], [0, 1, 1], [0.0, -0.5, -0.5], [-1, 0, 0], reward=reward,
                  policy="p", agent="agent", meta={"member": member})


def make(episode, group_fn, filter_fn=None, batch=4, group=2):
    controls = {"p": StalenessControl(batch, 0, max_concurrent=16)}
    return RolloutController(episode, controls, group_size=group, filter_fn=filter_fn,
                             group_fn=group_fn)


async def test_group_fn_runs_once_per_group_on_every_member_before_the_filter():
    calls: list[tuple[int, list[int]]] = []

    async def episode(seed, member):
        await asyncio.sleep(random.random() / 500)
        return {"p": [_sample(0.0, member)]}

    async def group_fn(seed, results):
        await asyncio.sleep(0.001)
        calls.append((seed, [r["p"][0].meta["member"] for r in results]))
        for r in results:  # reward member m with m: the filter then sees varied rewards
            r["p"][0].reward += r["p"][0].meta["member"]

    def zero_variance(policy, samples):
        rewards = {s.reward for s in samples}
        return ([], {"zero_reward_variance": 1}) if len(rewards) == 1 else (samples, {})

    ctl = make(episode, group_fn, zero_variance, batch=4, group=2)
    runner = asyncio.create_task(ctl.run())
    groups = await asyncio.wait_for(ctl.take("p", 4), 5)
    await ctl.stop()
    runner.cancel()
    assert sorted(seed for seed, _ in calls) == [0, 1]  # one call per group
    assert all(members == [0, 1] for _, members in calls)  # all members, in member order
    assert [sorted(s.reward for s in g.samples) for g in groups] == [[0.0, 1.0], [0.0, 1.0]]
    assert ctl.ledger["p"]["trained"] == 4 and not ctl.ledger["p"]["filtered:zero_reward_variance"]


async def test_a_failing_group_fn_fails_the_groups_episodes_and_the_run_goes_on():
    async def episode(seed, member):
        return {"p": [_sample(1.0, member)]}

    async def group_fn(seed, results):
        if seed == 0:
            raise RuntimeError("judge down")

    ctl = make(episode, group_fn, batch=2, group=2)
    runner = asyncio.create_task(ctl.run())
    groups = await asyncio.wait_for(ctl.take("p", 2), 5)
    await ctl.stop()
    runner.cancel()
    assert [g.seed for g in groups] == [1]
    assert ctl.ledger["p"]["failed"] == 2  # both episodes of seed 0, with the cause logged
    assert any("judge down" in str(e) for e in ctl.errors)
    c = ctl.controls["p"]
    assert c.submitted == c.running + c.waiting + c.accepted + c.filtered + c.failed


def _episode(answer: str) -> Episode:
    return Episode(["agent"], {"agent": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": answer}]},
                   {"agent": [0.0]}, {"agent": 0.0}, 1, "terminated")


async def test_reward_hooks_put_each_group_reward_on_its_own_members_samples():
    seen: list[list[str]] = []

    def by_answer(episodes):
        seen.append([e.messages["agent"][-1]["content"] for e in episodes])
        return [{"agent": float(e.messages["agent"][-1]["content"])} for e in episodes]

    hooks = RewardHooks([], [by_answer], {}, [])
    for member, answer in enumerate(["3", "1", "2"]):
        hooks.record(7, member, _episode(answer))
    results = [{"p": [_sample(0.5, 0), _sample(0.5, 0)]}, RuntimeError("failed"),
               {"p": [_sample(0.5, 2)]}]
    await hooks.on_group(7, results)
    assert seen == [["3", "2"]]  # the failed member is not judged
    assert [s.reward for s in results[0]["p"]] == [3.5, 3.5]
    assert [s.reward for s in results[2]["p"]] == [2.5]
    assert hooks._episodes == {}
