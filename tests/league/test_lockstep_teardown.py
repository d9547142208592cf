"""``run_lockstep``: a failing policy step cancels and awaits the other policies' steps of the
same global step, so none outlives the failure ("Task exception was never retrieved")."""

from __future__ import annotations

import asyncio
import gc

import pytest

from areal_agents.trainers.clocks import run_lockstep


async def _noop(*_args) -> None:
    return None


async def test_a_failing_step_cancels_and_awaits_the_others():
    cancelled: list[str] = []

    async def train(policy: str) -> dict[str, float]:
        if policy == "a":
            raise RuntimeError("a is deadlocked")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(policy)
            raise
        return {}

    with pytest.raises(RuntimeError, match="a is deadlocked"):
        await run_lockstep({"a": 1, "b": 1}, start=0, steps=3, train=train, on_step=_noop,
                           on_barrier=_noop)
    assert cancelled == ["b"]  # cancelled before run_lockstep returned, not left running


async def test_a_second_failure_is_retrieved_not_logged_at_teardown():
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    b_failed = asyncio.Event()

    async def train(policy: str) -> dict[str, float]:
        if policy == "a":
            raise RuntimeError("a is deadlocked")
        try:
            await asyncio.sleep(3600)
        finally:  # a step that fails while being torn down (e.g. its engine already closed)
            b_failed.set()
            raise ValueError("b failed during teardown")

    try:
        with pytest.raises(RuntimeError, match="a is deadlocked"):
            await run_lockstep({"a": 1, "b": 1}, start=0, steps=1, train=train, on_step=_noop,
                               on_barrier=_noop)
        assert b_failed.is_set()
        gc.collect()
        await asyncio.sleep(0)
        assert [c["message"] for c in unhandled] == []
    finally:
        loop.set_exception_handler(None)


async def test_steps_and_results_unchanged():
    rows: list[tuple[int, dict]] = []

    async def on_step(step: int, results: dict) -> None:
        rows.append((step, results))

    async def train(policy: str) -> dict[str, float]:
        await asyncio.sleep(0)
        return {f"{policy}/loss": 1.0}

    await run_lockstep({"a": 1, "b": 2}, start=1, steps=3, train=train, on_step=on_step,
                       on_barrier=_noop)
    assert rows == [(2, {"a": {"a/loss": 1.0}, "b": {"b/loss": 1.0}}), (3, {"a": {"a/loss": 1.0}})]
