"""RolloutController bookkeeping pinned exactly (survivors of the rollout mutation run): the
failure and filter limits at the limit and one below, the ledger after failures, filters and
stale drops, the seed sequence after a resume, short batches, partial groups, stop/restart.

Everything runs on the virtual clock (``run_virtual``), so times and counts are exact; every
``take`` has a (virtual) timeout so a broken controller fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from areal_agents.rollout import AllFiltered, RolloutController, RolloutFailed, StalenessControl
from areal_agents.samples import Sample
from areal_agents.testing.sim import run_virtual


def sample(policy: str = "p", reward: float = 0.0, version: int = 0) -> Sample:
    return Sample([1, 2], [0, 1], [0.0, -0.5], [-1, version], reward=reward, policy=policy)


def make(episode, *, batch=2, staleness=0, concurrent=16, group=1, policies=("p",),
         **kwargs: Any) -> RolloutController:
    controls = {p: StalenessControl(batch, staleness, max_concurrent=concurrent)
                for p in policies}
    return RolloutController(episode, controls, group_size=group, **kwargs)


def play(ctl: RolloutController, body: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``body()`` with ``ctl.run()`` alongside on the virtual clock, then ``stop``; no
    exception may reach the event loop's handler (e.g. a broken task callback)."""
    loop_errors: list[dict[str, Any]] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        runner = asyncio.create_task(ctl.run())
        try:
            return await body()
        finally:
            await ctl.stop()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    out = run_virtual(main())
    assert loop_errors == []
    return out


async def take(ctl: RolloutController, policy: str, n: int, timeout: float = 1000.0):
    return await asyncio.wait_for(ctl.take(policy, n), timeout)


def now() -> float:
    return asyncio.get_running_loop().time()


def balanced(c: StalenessControl) -> bool:
    return c.submitted == c.running + c.waiting + c.accepted + c.filtered + c.failed


# ---- consecutive failures -------------------------------------------------------------------


async def crash(seed: int, member: int) -> dict[str, list[Sample]]:
    await asyncio.sleep(1.0)
    raise RuntimeError(f"crash {seed}")


@pytest.mark.parametrize("limit", [3, None])  # None: the default, 256
def test_take_raises_at_exactly_the_failure_limit(limit):
    kwargs = {} if limit is None else {"max_consecutive_failures": limit}
    ctl = make(crash, concurrent=1, **kwargs)
    assert ctl.consecutive_failures == 0

    async def body():
        with pytest.raises(RolloutFailed) as info:
            await take(ctl, "p", 2)
        return info.value, now(), ctl.ledger["p"]["failed"]

    err, when, failed = play(ctl, body)
    n = limit or 256
    assert (when, failed) == (float(n), n)  # one episode a second, raised at the n-th failure
    assert str(err) == (f"{n} episodes failed in a row; the last error: "
                        f"RuntimeError('crash {n - 1}'). Fix the env/agent/engine error above "
                        "and restart")
    assert err.__cause__ is ctl.errors[-1] and str(err.__cause__) == f"crash {n - 1}"


def test_a_success_resets_the_failure_streak():
    async def episode(seed, member):
        await asyncio.sleep(1.0)
        if seed in (0, 1, 3, 4):  # two failures, a success, two failures: never three in a row
            raise RuntimeError(f"crash {seed}")
        return {"p": [sample()]}

    ctl = make(episode, concurrent=1, max_consecutive_failures=3)
    groups = play(ctl, lambda: take(ctl, "p", 2))
    assert [g.seed for g in groups] == [2, 5]
    assert ctl.ledger["p"]["failed"] == 4 and ctl.ledger["p"]["trained"] == 2


def test_errors_keep_the_latest_100_and_each_failure_is_logged(caplog):
    ctl = make(crash, concurrent=1, max_consecutive_failures=0)  # 0: never raise

    async def body():
        await asyncio.sleep(150.5)
        return list(ctl.errors)

    with caplog.at_level(logging.WARNING, logger="areal_agents.rollout.controller"):
        errors = play(ctl, body)
    assert ctl.ledger["p"]["failed"] == 150
    assert [str(e) for e in errors] == [f"crash {s}" for s in range(50, 150)]
    messages = [r.getMessage() for r in caplog.records if r.name.endswith("controller")]
    assert messages[:2] == ["episode 0 of seed 0 failed: RuntimeError('crash 0')",
                            "episode 0 of seed 1 failed: RuntimeError('crash 1')"]


def test_an_episode_cancelled_from_inside_counts_as_failed_and_a_short_batch_of_one():
    """An episode whose own await was cancelled (not by the controller) fails its member; the
    group of one surviving episode cannot be completed under the budget, so ``take`` returns
    it alone (a batch of 1 < 2)."""

    async def episode(seed, member):
        await asyncio.sleep(1.0)
        if (seed, member) == (0, 0):
            raise asyncio.CancelledError  # e.g. an inner request cancelled by someone else
        return {"p": [sample()]}

    ctl = make(episode, group=2)

    async def body():
        groups = await take(ctl, "p", 2)
        return groups, now(), dict(ctl.ledger["p"]), ctl.controls["p"].failed

    groups, when, ledger, failed = play(ctl, body)
    assert [(g.seed, g.policy, g.num_episodes) for g in groups] == [(0, "p", 1)]
    # seed 1's first member (admitted with the budget the failure freed) ended at t=2; its
    # second cannot be admitted before an update: nothing runs, nothing can be admitted; the
    # next version could not train seed 1 (synchronous), so it is dropped at once
    assert when == 2.0
    assert ledger == {"failed": 1, "trained": 1, "filtered:too_stale": 1} and failed == 1


# ---- consecutive filtered groups ------------------------------------------------------------


def drop_all(policy, samples):
    return [], {"zero_variance": len(samples), "other": 1}


async def instant(seed, member):
    await asyncio.sleep(1.0)
    return {"p": [sample(reward=float(member))]}


async def staggered(seed, member):  # groups end in seed order
    await asyncio.sleep(1.0 + seed / 100)
    return {"p": [sample(reward=float(member))]}


@pytest.mark.parametrize("limit", [3, None])  # None: the default, 512
def test_take_raises_at_exactly_the_filtered_limit(limit):
    kwargs = {} if limit is None else {"max_consecutive_filtered": limit}
    ctl = make(instant, concurrent=1, filter_fn=drop_all, **kwargs)

    async def body():
        with pytest.raises(AllFiltered) as info:
            await take(ctl, "p", 2)
        return str(info.value), now()

    message, when = play(ctl, body)
    n = limit or 512
    assert when == float(n)
    assert message == (
        f"the last {n} groups were all filtered for policy 'p' (episodes so far: "
        f"{{'filtered:zero_variance': {n}}}); its batch cannot fill. If the reason is zero "
        "reward variance the task is solved or unsolvable at this group size: stop, make the "
        "task harder or easier, or use an algorithm that keeps such groups (e.g. GRPO instead "
        "of DAPO)")


def test_one_filtered_group_below_the_limit_does_not_raise():
    def drop_first_two(policy, samples):
        return ([], {"zero_variance": 1}) if samples[0].reward < 2 else (samples, {})

    async def episode(seed, member):
        await asyncio.sleep(1.0)
        return {"p": [sample(reward=float(seed))]}

    ctl = make(episode, concurrent=1, filter_fn=drop_first_two, max_consecutive_filtered=3)
    groups = play(ctl, lambda: take(ctl, "p", 2))
    assert [g.seed for g in groups] == [2, 3]


# ---- outcomes of a finished group -----------------------------------------------------------


def test_a_group_whose_members_all_failed_is_resolved_for_every_policy():
    async def episode(seed, member):
        await asyncio.sleep(1.0)
        if seed == 0:
            raise RuntimeError("crash")
        return {p: [sample(p)] for p in ("p", "q")}

    ctl = make(episode, group=2, policies=("p", "q"))

    async def body():
        p = await take(ctl, "p", 2)
        q = await take(ctl, "q", 2)
        return [g.seed for g in p], [g.seed for g in q], ctl.state_dict()

    p, q, state = play(ctl, body)
    assert p == q == [1]
    assert (state["cursor"], state["done"]) == (2, [])  # seed 0 needs no replay
    assert state["ledger"] == {"p": {"failed": 2, "trained": 2}, "q": {"failed": 2, "trained": 2}}


def test_a_policy_without_samples_is_filtered_as_no_samples():
    async def episode(seed, member):
        await asyncio.sleep(1.0)
        return {"p": [sample()]}  # policy q's agent never acted

    ctl = make(episode, group=2, policies=("p", "q"))

    async def body():
        groups = await take(ctl, "p", 2)
        return [g.seed for g in groups], ctl.state_dict()

    seeds, state = play(ctl, body)
    assert seeds == [0]
    assert state["ledger"]["q"] == {"filtered:no_samples": 2}
    assert (state["cursor"], state["done"]) == (1, [])


def test_a_filter_that_gives_no_reason_counts_filtered_empty():
    def drop_seed_0(policy, samples):
        return ([], {}) if samples[0].reward == 0 else (samples, {})

    async def episode(seed, member):
        await asyncio.sleep(1.0)
        return {"p": [sample(reward=float(seed))]}

    ctl = make(episode, group=2, filter_fn=drop_seed_0)

    async def body():
        groups = await take(ctl, "p", 2)
        return [g.seed for g in groups], ctl.state_dict()

    seeds, state = play(ctl, body)
    assert seeds == [1]
    assert state["ledger"]["p"] == {"filtered:empty": 2, "trained": 2}
    assert (state["cursor"], state["done"]) == (2, [])


# ---- take -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("num", "taken", "dropped"), [(4, [0, 1], 2), (2, [0], 4)])
def test_groups_the_next_version_cannot_train_are_dropped_right_after_take(num, taken, dropped):
    ctl = make(staggered, batch=6, group=2)  # synchronous: 3 groups of version 0 buffered

    async def body():
        await asyncio.sleep(2.0)
        groups = await take(ctl, "p", num)
        c = ctl.controls["p"]
        return ([g.seed for g in groups], ctl.buffered("p"), dict(ctl.ledger["p"]),
                (c.accepted, c.filtered), ctl.state_dict()["cursor"])

    seeds, buffered, ledger, counters, cursor = play(ctl, body)
    assert seeds == taken and buffered == 0
    assert ledger == {"trained": 6 - dropped, "filtered:too_stale": dropped}
    assert counters == (6 - dropped, dropped)
    assert cursor == 3  # the dropped seeds are resolved


def test_take_stops_once_the_batch_is_full():
    ctl = make(staggered, batch=2, staleness=1, group=2)  # 2 groups buffered

    async def body():
        await asyncio.sleep(2.0)
        groups = await take(ctl, "p", 2)
        return [g.seed for g in groups], ctl.buffered("p")

    assert play(ctl, body) == ([0], 2)


def test_take_never_returns_an_empty_batch():
    async def episode(seed, member):
        version = ctl.controls["p"].version
        await asyncio.sleep(1.0)
        return {"p": [sample(version=version)]}

    ctl = make(episode, group=2)

    async def body():
        first = await take(ctl, "p", 2)
        second = asyncio.create_task(take(ctl, "p", 2))
        await asyncio.sleep(10.0)  # nothing buffered, nothing can be admitted before an update
        waited = not second.done()
        await ctl.update_weights("p", lambda: asyncio.sleep(0), 1)
        return [g.seed for g in first], waited, [g.seed for g in await second]

    assert play(ctl, body) == ([0], True, [1])


def test_no_short_batch_while_episodes_can_still_be_admitted():
    """The moment a group ends, nothing runs but the budget admits more: not stalled."""
    ctl = make(instant, batch=4, staleness=1, concurrent=2, group=2)

    async def body():
        groups = await take(ctl, "p", 4)
        return [g.seed for g in groups], now()

    assert play(ctl, body) == ([0, 1], 2.0)


# ---- seeds ----------------------------------------------------------------------------------


def test_seeds_after_a_resume_skip_exactly_the_resolved_ones():
    seeds: list[int] = []

    async def episode(seed, member):
        seeds.append(seed)
        await asyncio.sleep(1.0)
        return {"p": [sample()]}

    ctl = make(episode, batch=4)
    ctl.load_state_dict({"cursor": 4, "done": [5, 7]})
    play(ctl, lambda: take(ctl, "p", 4))
    assert seeds == [4, 6, 8, 9]
    assert ctl.skip == set()  # consumed


def test_stop_then_run_again_continues_and_the_cursor_moves_on():
    """``afit`` twice in one loop: ``run`` after ``stop`` admits new seeds; the group cancelled
    by ``stop`` is resolved (``failed:cancelled``), so it does not pin the data cursor."""

    async def episode(seed, member):
        version = ctl.controls["p"].version
        await asyncio.sleep(5.0 if seed == 1 else 1.0)
        return {"p": [sample(version=version)]}

    async def main():
        runner = asyncio.create_task(ctl.run())
        first = await take(ctl, "p", 2)  # seeds 0 and 2 (1 is slow), 3 stays buffered
        await ctl.stop()
        await asyncio.gather(runner, return_exceptions=True)
        cancelled = ctl.ledger["p"]["failed:cancelled"]
        runner = asyncio.create_task(ctl.run())
        second = []
        for version in (1, 2):
            await ctl.update_weights("p", lambda: asyncio.sleep(0), version)
            second += await take(ctl, "p", 2)
        state = ctl.state_dict()
        await ctl.stop()
        await asyncio.gather(runner, return_exceptions=True)
        return [g.seed for g in first], cancelled, [g.seed for g in second], state

    ctl = make(episode, staleness=1)
    first, cancelled, second, state = run_virtual(main())
    assert (first, cancelled, second) == ([0, 2], 1, [3, 4, 5, 6])
    assert (state["cursor"], state["done"]) == (7, [])


def test_stop_waits_for_cancelled_episodes_to_unwind():
    closed: list[int] = []

    async def episode(seed, member):
        try:
            await asyncio.sleep(100.0)
        finally:
            closed.append(seed)  # e.g. the env's sessions closed
        return {"p": [sample()]}

    ctl = make(episode, batch=2, group=2)

    async def body():
        await asyncio.sleep(1.0)
        await ctl.stop()
        return sorted(closed)

    assert play(ctl, body) == [0, 0]


# ---- partial groups -------------------------------------------------------------------------


def test_partial_groups_exact_steps_and_counts():
    """Seed 0 has two stragglers (100 s); everything else takes 1 s. Seed 0 is trained without
    them only at the last step that may train it (step 1, lag 1), never earlier. Groups only
    partly admitted when the budget ran out (seed 3: 2 of 4) are trained the same way at their
    last chance; their members admitted after the update count as stragglers too."""
    slow = {(0, 1), (0, 2)}

    async def episode(seed, member):
        version = ctl.controls["p"].version
        await asyncio.sleep(100.0 if (seed, member) in slow else 1.0)
        return {"p": [sample(version=version)]}

    ctl = make(episode, batch=4, staleness=1, group=4, partial_groups=2)

    async def body():
        steps = []
        for step in range(3):
            groups = await take(ctl, "p", 4)
            steps.append((now(), [(g.seed, g.num_episodes, g.min_version) for g in groups],
                          ctl.ledger["p"]["filtered:straggler"]))
            await asyncio.sleep(2.0)
            await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
        return steps

    assert play(ctl, body) == [(1.0, [(1, 4, 0)], 0), (4.0, [(0, 2, 0), (2, 4, 1)], 2),
                               (7.0, [(3, 2, 1), (4, 4, 2)], 4)]
    c = ctl.controls["p"]
    assert (c.running, c.waiting) == (0, 0) and balanced(c)


def test_partial_groups_count_only_members_that_succeeded():
    """Seed 0: one success, one failure, one straggler. One success is fewer than
    partial_groups=2, so at its last chance (step 1) it is not trained without the straggler."""

    async def episode(seed, member):
        version = ctl.controls["p"].version
        await asyncio.sleep(100.0 if (seed, member) == (0, 2) else 1.0)
        if (seed, member) == (0, 1):
            raise RuntimeError("crash")
        return {"p": [sample(version=version)]}

    ctl = make(episode, batch=3, staleness=1, group=3, partial_groups=2)

    async def body():
        steps = []
        for step in range(2):
            groups = await take(ctl, "p", 3)
            steps.append((now(), [(g.seed, g.num_episodes) for g in groups]))
            await asyncio.sleep(2.0)
            await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
        return steps, dict(ctl.ledger["p"])

    steps, ledger = play(ctl, body)
    assert steps == [(1.0, [(1, 3)]), (4.0, [(2, 3)])]
    assert ledger["trained"] == 6 and "filtered:straggler" not in ledger


def test_partial_groups_skip_an_unready_group_and_truncate_the_next():
    """Seeds 0 and 1 are both at their last chance; seed 0 has 1 member done (< 2), seed 1
    has 2: seed 1 is trained at once without its stragglers."""

    async def episode(seed, member):
        done_early = member == 3 if seed == 0 else member < 2
        await asyncio.sleep(1.0 if done_early else 100.0)
        return {"p": [sample()]}

    ctl = make(episode, batch=8, group=4, partial_groups=2)

    async def body():
        groups = await take(ctl, "p", 2)
        return [(g.seed, g.num_episodes) for g in groups], now()

    assert play(ctl, body) == ([(1, 2)], 1.0)


def test_partial_groups_truncate_a_group_still_being_admitted():
    """group_size 4 > batch 2 (synchronous): only 2 members fit the budget, so each group is
    trained with those 2 and admission moves on to the next seed."""

    async def episode(seed, member):
        version = ctl.controls["p"].version
        await asyncio.sleep(1.0)
        return {"p": [sample(version=version)]}

    ctl = make(episode, batch=2, group=4, partial_groups=2)

    async def body():
        trained = []
        for step in range(3):
            trained += [(g.seed, g.num_episodes) for g in await take(ctl, "p", 2)]
            await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
        return trained

    assert play(ctl, body) == [(0, 2), (1, 2), (2, 2)]


# ---- StalenessControl -----------------------------------------------------------------------


def test_staleness_control_bounds_and_messages():
    StalenessControl(2, max_staleness=0, max_concurrent=1)  # the smallest valid values
    with pytest.raises(ValueError) as info:
        StalenessControl(2, max_staleness=-1)
    assert str(info.value) == "max_staleness must be >= 0, got -1"
    with pytest.raises(ValueError) as info:
        StalenessControl(2, max_concurrent=0)
    assert str(info.value) == "max_concurrent must be >= 1, got 0"


def test_consume_adds_up_and_set_version_may_repeat_the_version():
    c = StalenessControl(4)
    c.consume(3)
    c.consume(2)
    c.set_version(1)
    assert (c.version, c.overshoot, c.consumed) == (1, 1, 0)  # 5 trained for one batch of 4
    c.set_version(1)  # an update that did not change the version: allowed, nothing credited
    assert (c.version, c.overshoot) == (1, 1)


def test_resume_leaves_paused_false_in_the_state():
    c = StalenessControl(2)
    c.pause()
    c.resume()
    assert c.state_dict()["paused"] is False
