"""Shared test helper: a lockstep run that can never fill a batch must stop with ``Deadlocked``
naming ``clock='independent'``, close cleanly, and leave no failed task behind."""

from __future__ import annotations

import asyncio
import gc
from contextlib import asynccontextmanager

import pytest

from areal_agents.rollout.controller import Deadlocked


@asynccontextmanager
async def unhandled_task_errors():
    """Collect what the running loop's exception handler gets ("Task exception was never
    retrieved", "Task was destroyed but it is pending") into the yielded list; on exit, let
    left-over tasks end and be collected first, then restore the default handler."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        yield unhandled
    finally:
        for _ in range(3):
            await asyncio.sleep(0.1)  # let every task a failure left behind end
        gc.collect()
        loop.set_exception_handler(None)


async def assert_deadlocks(trainer, steps: int, policy: str) -> None:
    """``trainer.afit(steps)`` raises ``Deadlocked`` for ``policy`` (a regex) with the fix
    ``clock='independent'``; then ``aclose``; nothing is logged as an unhandled task error."""
    async with unhandled_task_errors() as unhandled:
        try:
            with pytest.raises(Deadlocked, match=rf"policy '{policy}' waits for a batch but no "
                               r"episode can be admitted .* use clock='independent'"):
                await asyncio.wait_for(trainer.afit(steps), 300)  # a hang guard, not a threshold
        finally:
            await trainer.aclose()
    assert [c["message"] for c in unhandled] == []
