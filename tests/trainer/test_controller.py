"""RolloutController with fake episodes: grouping, outcomes, filtering, staleness, updates."""

from __future__ import annotations

import asyncio
import random

import pytest

from areal_agents.rollout import RolloutController, StalenessControl
from areal_agents.samples import Sample


def _sample(reward: float, version: int, policy: str = "p") -> Sample:
    return Sample([1, 2, 3], [0, 1, 1], [0.0, -0.5, -0.5], [-1, version, version], reward=reward,
                  policy=policy)


def make_controller(episode, *, batch=4, staleness=0, group=2, filter_fn=None, policies=("p",)):
    controls = {p: StalenessControl(batch, staleness, max_concurrent=16) for p in policies}
    return RolloutController(episode, controls, group_size=group, filter_fn=filter_fn)


def zero_variance(policy, samples):
    rewards = {s.reward for s in samples}
    return ([], {"zero_reward_variance": len(samples)}) if len(rewards) == 1 else (samples, {})


async def test_groups_share_a_seed_and_outcomes_add_up():
    seen: list[tuple[int, int]] = []

    async def episode(seed, member):
        seen.append((seed, member))
        await asyncio.sleep(random.random() / 1000)
        if seed == 1 and member == 0:
            raise RuntimeError("env crashed")
        return {"p": [_sample(float(member), 0)], "q": [_sample(1.0, 0, "q")]}

    ctl = make_controller(episode, batch=4, staleness=1, policies=("p", "q"))
    runner = asyncio.create_task(ctl.run())
    groups = await asyncio.wait_for(ctl.take("p", 3), 5)
    await ctl.stop()
    runner.cancel()
    assert {g.seed for g in groups} <= {0, 1, 2, 3}
    for g in groups:
        assert all(s.policy == "p" for s in g.samples)
    assert sorted(m for s, m in seen if s == 0) == [0, 1]
    counts = ctl.counts()["p"]
    assert counts["failed"] >= 1 and any(isinstance(e, RuntimeError) for e in ctl.errors)
    for c in ctl.controls.values():
        assert c.submitted == c.running + c.accepted + c.filtered + c.failed


async def test_all_filtered_never_deadlocks_and_names_reason():
    calls = 0

    async def episode(seed, member):
        nonlocal calls
        calls += 1
        return {"p": [_sample(0.0, 0)]}  # every group has zero variance

    ctl = make_controller(episode, batch=2, staleness=0, filter_fn=zero_variance)
    runner = asyncio.create_task(ctl.run())
    for _ in range(200):
        await asyncio.sleep(0)
        if ctl.ledger["p"]["filtered:zero_reward_variance"] >= 20:
            break
    await ctl.stop()
    runner.cancel()
    assert calls >= 20  # kept admitting although nothing was ever accepted
    assert ctl.ledger["p"]["filtered:zero_reward_variance"] >= 20
    assert ctl.controls["p"].accepted == 0


async def test_synchronous_mode_admits_one_batch_per_version():
    versions: list[int] = []
    ctl: RolloutController

    async def episode(seed, member):
        versions.append(ctl.controls["p"].version)
        await asyncio.sleep(0)
        return {"p": [_sample(float(member), ctl.controls["p"].version)]}

    ctl = make_controller(episode, batch=4, staleness=0, group=2)
    runner = asyncio.create_task(ctl.run())
    for step in range(3):
        groups = await asyncio.wait_for(ctl.take("p", 4), 5)
        assert {s.versions[1] for g in groups for s in g.samples} == {step}
        await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
    await ctl.stop()
    runner.cancel()
    assert versions[:12] == [0] * 4 + [1] * 4 + [2] * 4
    assert ctl.ledger["p"]["trained"] == 12


async def test_failed_update_keeps_admitting():
    async def episode(seed, member):
        return {"p": [_sample(float(member), ctl.controls["p"].version)]}

    async def broken():
        raise OSError("engine unreachable")

    ctl = make_controller(episode, batch=2, staleness=0, group=2)
    runner = asyncio.create_task(ctl.run())
    await asyncio.wait_for(ctl.take("p", 2), 5)
    with pytest.raises(OSError, match="engine unreachable"):
        await ctl.update_weights("p", broken, 1)
    assert not ctl.controls["p"].paused and ctl.controls["p"].version == 0
    await ctl.update_weights("p", lambda: asyncio.sleep(0), 1)
    groups = await asyncio.wait_for(ctl.take("p", 2), 5)
    assert len(groups) == 1
    await ctl.stop()
    runner.cancel()


async def test_max_concurrent_below_group_size_is_rejected():
    with pytest.raises(ValueError, match="max_concurrent=2 < group_size=4"):
        RolloutController(lambda s, m: None, {"p": StalenessControl(4, max_concurrent=2)},
                          group_size=4)


async def test_too_stale_groups_are_filtered_and_free_their_slot():
    async def episode(seed, member):
        return {"p": [_sample(float(member), 0)]}  # claims version 0 forever

    ctl = make_controller(episode, batch=2, staleness=0, group=2)
    runner = asyncio.create_task(ctl.run())
    await asyncio.wait_for(ctl.take("p", 2), 5)
    await ctl.update_weights("p", lambda: asyncio.sleep(0), 1)
    for _ in range(50):
        await asyncio.sleep(0)
    take = asyncio.create_task(ctl.take("p", 2))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not take.done()
    take.cancel()
    await ctl.stop()
    runner.cancel()
    assert ctl.ledger["p"]["filtered:too_stale"] >= 2
    c = ctl.controls["p"]
    assert c.submitted == c.running + c.accepted + c.filtered + c.failed


async def test_cursor_state_replays_unresolved_seeds_only():
    async def episode(seed, member):
        await asyncio.sleep(0.001 * (seed % 3))
        return {"p": [_sample(float(member), ctl.controls["p"].version)]}

    ctl = make_controller(episode, batch=2, staleness=2, group=2)
    runner = asyncio.create_task(ctl.run())
    trained = []
    for step in range(3):
        groups = await asyncio.wait_for(ctl.take("p", 2), 5)
        trained += [g.seed for g in groups]
        await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
    state = ctl.state_dict()
    await ctl.stop()
    runner.cancel()
    assert state["controls"]["p"]["version"] == 3
    ctl2 = make_controller(episode, batch=2, staleness=2, group=2)
    ctl2.load_state_dict(state)
    assert ctl2.controls["p"].capacity() == 6  # rebased: (2 + 3 + 1) * 2 - 3 * 2
    runner = asyncio.create_task(ctl2.run())
    groups = await asyncio.wait_for(ctl2.take("p", 6), 5)
    await ctl2.stop()
    runner.cancel()
    replayed = [g.seed for g in groups]
    assert not set(replayed) & set(trained)  # nothing trained twice
    assert min(replayed) == min(set(range(10)) - set(trained))  # nothing skipped


async def test_all_episodes_failing_raises_instead_of_hanging():
    from areal_agents.rollout import RolloutFailed

    async def episode(seed, member):
        raise ConnectionError("engine down")

    controls = {"p": StalenessControl(2, 0, max_concurrent=16)}
    ctl = RolloutController(episode, controls, group_size=2, max_consecutive_failures=6)
    runner = asyncio.create_task(ctl.run())
    with pytest.raises(RolloutFailed, match="engine down"):
        await asyncio.wait_for(ctl.take("p", 2), 5)
    await ctl.stop()
    runner.cancel()
    assert ctl.ledger["p"]["failed"] >= 6


async def test_finished_training_sessions_are_dropped_from_the_gateway():
    """Each episode's sessions are forgotten once their samples are taken (no growth)."""
    from areal_agents.trainers.llm_session import make_llm_agent
    from areal_agents.trainers.policy import Policy

    import areal_agents as aa
    from areal_agents.testing.engine import ScriptedEngine

    _model, tokenizer = aa.models.tiny("xs", seed=0)
    gateway = aa.Gateway()
    gateway.add_policy("p", [ScriptedEngine(["hello"], tokenizer=tokenizer)], tokenizer)
    client = gateway.async_client()
    agent = await make_llm_agent(gateway, client, Policy(model="tiny:xs"), "p", "speaker")
    await agent.act([{"role": "user", "content": "hi"}])
    samples = await agent.end_episode(1.0)
    assert len(samples) == 1 and samples[0].reward == 1.0
    assert sum(samples[0].loss_mask) >= 1
    assert gateway._sessions == {}
