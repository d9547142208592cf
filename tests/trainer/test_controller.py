"""RolloutController with fake episodes: grouping, outcomes, filtering, staleness, updates."""

from __future__ import annotations

import asyncio
import random

import pytest

from areal_agents.rollout import RolloutController, StalenessControl
from areal_agents.samples import Sample
from areal_agents.testing.sim import SimEngine, run_virtual


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
        assert c.submitted == c.running + c.waiting + c.accepted + c.filtered + c.failed


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


def test_max_concurrent_below_group_size_admits_members_one_by_one():
    """A group larger than max_concurrent still runs: its members are admitted as slots free."""
    live, peak = 0, 0

    async def episode(seed, member):
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await asyncio.sleep(1.0 + member)
        live -= 1
        return {"p": [_sample(float(member), 0)]}

    async def main():
        ctl = RolloutController(episode, {"p": StalenessControl(4, max_concurrent=2)},
                                group_size=4)
        runner = asyncio.create_task(ctl.run())
        groups = await ctl.take("p", 4)
        await ctl.stop()
        runner.cancel()
        return groups

    groups = run_virtual(main())
    assert [g.seed for g in groups] == [0] and groups[0].num_episodes == 4
    assert peak == 2


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
    assert c.submitted == c.running + c.waiting + c.accepted + c.filtered + c.failed


def test_cursor_state_replays_unresolved_seeds_only():
    async def episode(seed, member):
        await asyncio.sleep(0.001 * (seed % 3))
        return {"p": [_sample(float(member), ctl.controls["p"].version)]}

    async def first_run():
        runner = asyncio.create_task(ctl.run())
        trained = []
        for step in range(3):
            groups = await ctl.take("p", 2)
            trained.extend(g.seed for g in groups)
            await asyncio.sleep(0.01)  # the train step: longer than any episode
            await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
        state = ctl.state_dict()
        await ctl.stop()
        runner.cancel()
        return trained, state

    async def resumed():
        runner = asyncio.create_task(ctl2.run())
        groups = await ctl2.take("p", 6)
        await ctl2.stop()
        runner.cancel()
        return groups

    ctl = make_controller(episode, batch=2, staleness=2, group=2)
    trained, state = run_virtual(first_run())
    assert state["controls"]["p"]["version"] == 3
    assert ctl.ledger["p"]["filtered:too_stale"] == 0
    ctl2 = make_controller(episode, batch=2, staleness=2, group=2)
    ctl2.load_state_dict(state)
    assert ctl2.controls["p"].capacity() == 6  # rebased: (2 + 3 + 1) * 2 - 3 * 2
    replayed = [g.seed for g in run_virtual(resumed())]
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


class _Abort(BaseException):
    """Not an ``Exception``: as a test's ``pytest.fail`` raised inside an episode's call."""


async def test_an_episode_raising_a_base_exception_is_accounted_not_left_running():
    """Such an episode's task ends without a result; unaccounted, its group never finished and
    a take() waiting for it hung (the event loop idle) instead of the run going on or failing."""
    async def episode(seed, member):
        await asyncio.sleep(0)
        if seed == 0 and member == 1:
            raise _Abort("DID NOT RAISE")
        return {"p": [_sample(float(member), 0)]}

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: None)  # the aborted task's own report
    ctl = make_controller(episode, batch=2, staleness=1, group=2)
    runner = asyncio.create_task(ctl.run())
    groups = await asyncio.wait_for(ctl.take("p", 2), 5)  # hung here before
    await ctl.stop()
    runner.cancel()
    seed0 = [g for g in groups if g.seed == 0]
    assert len(groups) == 2 and [s.reward for s in seed0[0].samples] == [0.0]  # member 0 only
    counts = ctl.counts()["p"]
    assert counts["failed"] >= 1 and [type(e) for e in ctl.errors] == [_Abort]
    control = ctl.controls["p"]
    assert control.submitted == control.running + control.waiting + control.accepted + \
        control.filtered + control.failed


async def test_finished_training_sessions_are_dropped_from_the_gateway():
    """Each episode's sessions are forgotten once their samples are taken (no growth)."""
    import areal_agents as aa
    from areal_agents.testing.engine import ScriptedEngine
    from areal_agents.trainers.llm_session import open_seat
    from areal_agents.trainers.policy import Policy

    _model, tokenizer = aa.models.tiny("xs", seed=0)
    gateway = aa.Gateway()
    gateway.add_policy("p", [ScriptedEngine(["hello"], tokenizer=tokenizer)], tokenizer)
    client = gateway.async_client()
    seat = await open_seat(gateway, client, Policy(model="tiny:xs"), "p", "speaker")
    await seat.agent.act([{"role": "user", "content": "hi"}])
    samples = seat.take_samples(reward=1.0, group="0")
    assert len(samples) == 1 and samples[0].reward == 1.0
    assert sum(samples[0].loss_mask) >= 1
    assert gateway._sessions == {}


def test_finished_episodes_free_their_slot_while_the_group_waits():
    """A straggler holds one engine slot, not its whole group's: later seeds keep starting."""
    started: list[tuple[int, int, float]] = []

    async def episode(seed, member):
        started.append((seed, member, asyncio.get_running_loop().time()))
        await asyncio.sleep(100.0 if (seed, member) == (0, 0) else 1.0)
        return {"p": [_sample(float(member), 0)]}

    async def main():
        controls = {"p": StalenessControl(8, max_staleness=0, max_concurrent=4)}
        ctl = RolloutController(episode, controls, group_size=4)
        runner = asyncio.create_task(ctl.run())
        groups = await ctl.take("p", 4)  # seed 1 is done long before the straggler
        now = asyncio.get_running_loop().time()
        await ctl.stop()
        runner.cancel()
        return groups, ctl.counts()["p"], now

    groups, counts, now = run_virtual(main())
    assert [g.seed for g in groups] == [1] and now == 3.0
    # seed 0's three short members end at t=1: their slots start seed 1 (the 4th slot frees at 2)
    assert [(s, m, t) for s, m, t in started if s == 1] == [(1, 0, 1.0), (1, 1, 1.0),
                                                            (1, 2, 1.0), (1, 3, 2.0)]
    # synchronous training cannot use seed 0 after this step: cancelled, not awaited
    assert counts["outcome/filtered:too_stale"] == 4 and counts["outcome/trained"] == 4
    assert counts["running"] == counts["waiting"] == 0


def test_doomed_in_flight_group_is_cancelled_as_too_stale():
    """A group that can no longer be trained within max_staleness stops generating at once."""
    cancelled: list[int] = []

    async def episode(seed, member):
        try:
            await asyncio.sleep(1000.0 if seed == 0 else 1.0)
        except asyncio.CancelledError:
            cancelled.append(seed)
            raise
        return {"p": [_sample(float(member), ctl.controls["p"].version)]}

    async def main():
        lags = []
        runner = asyncio.create_task(ctl.run())
        for step in range(6):
            groups = await ctl.take("p", 2)
            lags += [step - g.min_version for g in groups]
            await asyncio.sleep(0.5)
            await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
        elapsed = asyncio.get_running_loop().time()
        before_stop = list(cancelled)
        await ctl.stop()
        runner.cancel()
        return lags, elapsed, before_stop

    ctl = make_controller(episode, batch=2, staleness=1, group=2)
    lags, elapsed, before_stop = run_virtual(main())
    assert before_stop == [0, 0]  # both members of the straggling seed, nothing else
    assert ctl.ledger["p"]["filtered:too_stale"] == 2
    assert 0 not in ctl.pending  # resolved: a resumed run does not replay it
    assert max(lags) <= 1 and elapsed < 20  # never waited for the straggler
    c = ctl.controls["p"]
    assert c.submitted == c.running + c.waiting + c.accepted + c.filtered + c.failed
    assert ctl.ledger["p"]["trained"] == 12


def _sim_throughput(max_staleness: int, steps: int = 60) -> tuple[float, int]:
    """Trained samples per simulated second on a long-tail engine; also the worst lag."""

    async def main():
        engine = SimEngine(slots=64, token_latency=0.0005, seed=0)

        async def episode(seed, member):
            _, first, _last = await engine.generate()
            return {"p": [_sample(0.0, first)]}

        ctl = make_controller(episode, batch=32, staleness=max_staleness, group=8)
        ctl.controls["p"].max_concurrent = 64
        runner = asyncio.create_task(ctl.run())
        loop = asyncio.get_running_loop()
        worst = 0
        for step in range(steps):
            groups = await ctl.take("p", 32)
            worst = max([worst, *(step - g.min_version for g in groups)])
            await asyncio.sleep(0.05)
            engine.update_weights(step + 1)
            await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
        rate = steps * 32 / loop.time()
        await ctl.stop()
        runner.cancel()
        return rate, worst

    return run_virtual(main())


def test_async_beats_sync_on_a_simulated_long_tail_engine():
    """Deterministic (simulated clock): staleness 2 trains > 3x the samples/s of staleness 0."""
    sync, sync_lag = _sim_throughput(0)
    asyn, async_lag = _sim_throughput(2)
    assert sync_lag == 0 and async_lag <= 2
    assert asyn > 3.0 * sync, (sync, asyn)
    assert asyn > 0.6 * 640, asyn  # 640 = 32 samples per 50 ms train step


def test_stop_fails_unfinished_groups_and_keeps_counters_balanced():
    """Generating and done-but-waiting members of unfinished groups all end failed:cancelled."""

    async def episode(seed, member):
        await asyncio.sleep(50.0 if member == 0 else 1.0)
        return {"p": [_sample(float(member), 0)]}

    async def main():
        ctl = make_controller(episode, batch=4, staleness=1, group=2)  # 8 admitted: 4 groups
        runner = asyncio.create_task(ctl.run())
        await asyncio.sleep(2.0)  # members 1 done (waiting), members 0 generating
        before = ctl.counts()["p"]
        await ctl.stop()
        runner.cancel()
        return ctl, before

    ctl, before = run_virtual(main())
    assert (before["running"], before["waiting"], before["submitted"]) == (4, 4, 8)
    c = ctl.controls["p"]
    assert (c.running, c.waiting, c.failed) == (0, 0, 8)
    assert ctl.ledger["p"]["failed:cancelled"] == 8


def test_failed_members_neither_deadlock_sync_training_nor_shrink_the_budget():
    """Groups that lost members cannot add up to the batch: a short batch, then full ones."""

    async def episode(seed, member):
        await asyncio.sleep(1.0)
        if seed == 0 and member == 0:
            raise RuntimeError("env crashed")
        return {"p": [_sample(float(member), ctl.controls["p"].version)]}

    async def main():
        runner = asyncio.create_task(ctl.run())
        sizes = []
        for step in range(4):
            groups = await ctl.take("p", 4)
            sizes.append(sum(g.num_episodes for g in groups))
            await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
        capacity = ctl.controls["p"].capacity()
        await ctl.stop()
        runner.cancel()
        return sizes, capacity

    ctl = make_controller(episode, batch=4, staleness=0, group=2)
    sizes, capacity = run_virtual(main())
    assert sizes == [3, 4, 4, 4]  # seed 0 lost a member; the budget allowed no replacement group
    assert capacity == 4  # one batch: the short step neither leaked nor over-credited budget
    c = ctl.controls["p"]
    assert c.failed == 1 and c.submitted == c.running + c.waiting + c.accepted + c.filtered + 1


def test_partial_groups_train_without_stragglers_at_the_last_chance():
    async def episode(seed, member):
        version = ctl.controls["p"].version
        await asyncio.sleep(100.0 if (seed, member) == (0, 1) else 1.0)
        return {"p": [_sample(float(member), version)]}

    async def main():
        lags = []
        runner = asyncio.create_task(ctl.run())
        for step in range(3):
            groups = await ctl.take("p", 4)
            lags += [(g.seed, g.num_episodes, step - g.min_version) for g in groups]
            await asyncio.sleep(2.0)
            await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
        await ctl.stop()
        runner.cancel()
        return lags

    controls = {"p": StalenessControl(4, max_staleness=1, max_concurrent=16)}
    ctl = RolloutController(episode, controls, group_size=4, partial_groups=2)
    lags = run_virtual(main())
    assert (0, 3, 1) in lags  # seed 0 trained at the last version allowed, without member 1
    assert all(lag <= 1 for _, _, lag in lags)
    assert ctl.ledger["p"]["filtered:straggler"] == 1
    with pytest.raises(ValueError, match=r"partial_groups must be in 0\.\.group_size=4"):
        RolloutController(episode, controls, group_size=4, partial_groups=5)


async def test_every_group_filtered_raises_with_the_reasons_instead_of_spinning():
    """AReaL#588: a batch that can never fill (every group filtered) must not wait forever."""
    from areal_agents.rollout import AllFiltered

    async def episode(seed, member):
        return {"p": [_sample(1.0, 0)]}

    def drop_all(policy, samples):
        return [], {"zero_variance": len(samples)}

    controls = {"p": StalenessControl(4, 0, max_concurrent=16)}
    ctl = RolloutController(episode, controls, group_size=2, filter_fn=drop_all,
                            max_consecutive_filtered=5)
    runner = asyncio.create_task(ctl.run())
    with pytest.raises(AllFiltered, match=r"last \d+ groups.*'filtered:zero_variance'.*GRPO"):
        await asyncio.wait_for(ctl.take("p", 4), 5)
    await ctl.stop()
    runner.cancel()
    assert ctl.consecutive_filtered["p"] >= 5
    assert ctl.ledger["p"]["filtered:zero_variance"] >= 10  # counted, not silently dropped


async def test_a_kept_group_resets_the_filtered_streak():
    async def episode(seed, member):
        return {"p": [_sample(float(seed), 0)]}  # the reward carries the task seed

    def keep_every_third(policy, samples):
        keep = int(samples[0].reward) % 3 == 0
        return (samples, {}) if keep else ([], {"zero_variance": len(samples)})

    controls = {"p": StalenessControl(6, 0, max_concurrent=16)}
    ctl = RolloutController(episode, controls, group_size=2, filter_fn=keep_every_third,
                            max_consecutive_filtered=3)
    runner = asyncio.create_task(ctl.run())
    # seeds 1, 2, 4, 5 are filtered: 4 in all, but never 3 in a row, so the batch fills
    groups = await asyncio.wait_for(ctl.take("p", 6), 5)
    await ctl.stop()
    runner.cancel()
    assert sorted(g.seed for g in groups) == [0, 3, 6]
