"""The scheduling simulators: virtual clock, slot accounting of ``SimEngine`` (incl. cancels)."""

from __future__ import annotations

import asyncio
import math

import pytest

from areal_agents.testing.sim import SimEngine, run_virtual


def test_slots_queue_and_busy_time_on_the_virtual_clock():
    engine = SimEngine(slots=2, token_latency=0.01, mu=3.0, sigma=0.0, max_tokens=100, seed=0)
    tokens = int(math.exp(3.0)) + 1  # sigma 0: every length is int(e^3) + 1 = 21

    async def main():
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(engine.generate() for _ in range(3)))
        return results, loop.time()

    results, elapsed = run_virtual(main())
    assert [r[0] for r in results] == [tokens] * 3
    assert elapsed == pytest.approx(2 * tokens * 0.01)  # 3 requests on 2 slots: two waves
    assert engine.busy == pytest.approx(3 * tokens * 0.01)
    assert engine.cancelled_busy == 0.0
    assert engine.generated == engine.requested == 3


def test_cancelled_request_counts_its_partial_slot_time_only():
    engine = SimEngine(slots=1, token_latency=0.01, mu=3.0, sigma=0.0, max_tokens=100, seed=0)

    async def main():
        task = asyncio.create_task(engine.generate())
        await asyncio.sleep(0.05)  # 5 of its 21 tokens decoded
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.generate()  # the slot is free again at once

    tokens, first, last = run_virtual(main())
    assert engine.cancelled_busy == pytest.approx(0.05)
    assert engine.busy == pytest.approx(tokens * 0.01)
    assert engine.generated == 1 and engine.requested == 2
    assert (first, last) == (0, 0)


def test_in_flight_request_records_the_weight_switch():
    engine = SimEngine(slots=1, token_latency=0.01, mu=3.0, sigma=0.0, max_tokens=100, seed=0)

    async def main():
        task = asyncio.create_task(engine.generate())
        await asyncio.sleep(0.1)
        engine.update_weights(3)
        return await task

    assert run_virtual(main())[1:] == (0, 3)


def test_bad_engine_arguments_raise():
    with pytest.raises(ValueError, match="slots >= 1"):
        SimEngine(slots=0)
