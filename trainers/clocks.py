"""Training clocks: when each trainable policy takes a batch and trains.

Two schedules share one vocabulary. A *policy step* is one update of one policy (its version
goes up by one, so ``policy/<name>/step`` is its version). The *global step* numbers the rows
of ``metrics.jsonl``; it is for logging, checkpoint names and ``fit(steps)``'s budget.

``"lockstep"`` (the default): global step ``n`` trains every policy due at ``n`` together
(``n % train_every == 0``) and waits for all of them; the slowest batch sets the pace. With
``max_staleness=0`` a resumed run reproduces the uninterrupted one (same batches, same rows),
which is why it stays the default.

``"independent"``: each policy trains as soon as its own batch is ready, whatever the others
are doing. Every finished policy step is one global step (its row holds that policy's train
metrics), so ``fit(steps)`` is a budget of policy steps shared by all policies: a policy
that gets samples k times as often takes about k times as many of them, and a rare role never
holds the others back. Checkpoints need every clock stopped (weights and controller state
saved together), so every ``checkpoint_every`` global steps no new step starts until the
running ones finished; then the checkpoint is written and every clock restarts where it
stopped. The order in which steps of different policies finish depends on timing, so
unlike lockstep an independent run is not bit-for-bit reproducible across a resume; each
policy's own step count, version and data cursor are.

``Policy(train_every=k)`` makes a policy train once per k batches, on all of them (k times
``batch_size`` episodes a step), in either schedule: a 1:k training ratio.

Example:
    >>> due(4, {"a": 1, "b": 4}), due(5, {"a": 1, "b": 4})
    (['a', 'b'], ['a'])
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Literal

from areal_agents.errors import ConfigError
from areal_agents.rollout.staleness import StalenessControl

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["CLOCKS", "Clock", "check_clock", "control_of", "due", "run_independent",
           "run_lockstep", "stop_task"]

Clock = Literal["lockstep", "independent"]
CLOCKS: tuple[Clock, ...] = ("lockstep", "independent")

Metrics = dict[str, float]
TrainFn = Callable[[str], Awaitable[Metrics]]
"""``train(policy) -> metrics``: take one batch of ``policy`` and train on it (lockstep)."""
StepFn = Callable[[int, dict[str, Metrics]], Awaitable[None]]
"""``on_step(global_step, {policy: metrics})``: log one global step's row."""


def check_clock(clock: str, train_every: Mapping[str, int]) -> Clock:
    """Validate the schedule name and the trainable policies' ``train_every``.

    Raises:
        ConfigError: an unknown clock, or no trainable policy with ``train_every=1`` (every
            global step of a lockstep run would wait for nothing).
    """
    if clock not in CLOCKS:
        raise ConfigError(f"clock={clock!r}; choose one of {list(CLOCKS)}")
    if train_every and min(train_every.values()) != 1:
        raise ConfigError(f"train_every={dict(train_every)}: at least one trainable policy must "
                          "train every batch (train_every=1); divide the others by the smallest")
    return clock  # type: ignore[return-value]


def control_of(policy: Policy, *, batch_size: int, max_staleness: int,
               max_concurrent: int) -> StalenessControl:
    """``policy``'s staleness control: ``train_every * batch_size`` episodes a step, its own
    ``max_staleness`` (else the Trainer's)."""
    staleness = max_staleness if policy.max_staleness is None else policy.max_staleness
    return StalenessControl(batch_size * policy.train_every, staleness, max_concurrent)


async def stop_task(task: asyncio.Task[object]) -> BaseException | None:
    """Cancel ``task`` (e.g. the rollout controller's admission loop) and wait until it ended.

    Returns:
        The exception ``task`` ended with, ``None`` if it returned or was cancelled. Either
        way the exception is retrieved here: a task that is only cancelled, never awaited,
        and had already failed is logged as "Task exception was never retrieved" when it is
        garbage-collected, and its failure is lost.
    """
    task.cancel()
    await asyncio.wait([task])
    return None if task.cancelled() else task.exception()


def due(step: int, train_every: Mapping[str, int]) -> list[str]:
    """The policies a lockstep run trains at global step ``step`` (1-based), sorted."""
    return sorted(p for p, k in train_every.items() if step % k == 0)


async def run_lockstep(train_every: Mapping[str, int], *, start: int, steps: int,
                       train: TrainFn, on_step: StepFn,
                       on_barrier: Callable[[int], Awaitable[None]]) -> None:
    """Global steps ``start + 1 .. steps``: the due policies train together, then
    ``on_step`` and ``on_barrier`` (every clock is stopped after each lockstep step).

    A failing step (e.g. ``Deadlocked``) cancels the other policies' steps of that global step
    and waits for them before it propagates, so none is left running into the teardown (a
    later failure there was logged as "Task exception was never retrieved").
    """
    for step in range(start + 1, steps + 1):
        names = due(step, train_every)
        if len(names) == 1:  # in this task: no task to start and no gather to resume from,
            results = [await train(names[0])]  # each a wait behind every episode callback
        else:
            tasks = [asyncio.create_task(train(p)) for p in names]
            try:
                results = await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        await on_step(step, dict(zip(names, results, strict=True)))
        await on_barrier(step)


async def run_independent(
    policies: list[str], *, start: int, steps: int, barrier_every: int,
    wait_ready: Callable[[list[str]], Awaitable[list[str]]],
    train: Callable[[str], Awaitable[Metrics]], on_step: StepFn,
    on_barrier: Callable[[int], Awaitable[None]],
) -> None:
    """Run every policy's clock until ``steps`` global steps are done.

    A policy whose batch is ready (``wait_ready(idle policies) -> the ready ones``) starts a
    step (``train(policy)``, which must find its batch without waiting) while the budget has
    room; each finished step is the next global step (``on_step``; finished together: by
    policy name). Every ``barrier_every`` global steps (0: never) no step starts until the
    running ones finished, then ``on_barrier(global_step)`` runs (e.g. a checkpoint).

    A failing step cancels the others and propagates.
    """
    step = claimed = start
    barrier = (start // barrier_every + 1) * barrier_every if barrier_every else steps
    running: dict[asyncio.Task[Metrics], str] = {}
    waiter: asyncio.Task[list[str]] | None = None
    try:
        while True:
            limit = min(steps, barrier)
            if not running and step >= limit:  # every clock stopped
                if step == barrier and barrier_every:
                    await on_barrier(step)
                    barrier += barrier_every
                if step >= steps:
                    return
                continue
            idle = [p for p in policies if p not in running.values()]
            if claimed < limit and idle:
                waiter = asyncio.create_task(wait_ready(idle))
            waits: set[asyncio.Task] = {*running, *([waiter] if waiter else [])}
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finished = sorted(done - {waiter}, key=lambda t: running[t])
            if waiter is not None:  # start the ready steps first: logging may take a while
                ready = waiter.result() if waiter in done else await _cancel(waiter)
                waiter = None
                for name in ready:
                    if claimed < limit:
                        claimed += 1
                        running[asyncio.create_task(train(name))] = name
            for task in finished:
                name = running.pop(task)
                step += 1
                await on_step(step, {name: task.result()})
    finally:
        for task in [*running, *([waiter] if waiter else [])]:
            task.cancel()
        await asyncio.gather(*running, *([waiter] if waiter else []), return_exceptions=True)


async def _cancel(task: asyncio.Task[list[str]]) -> list[str]:
    """Cancel a ``wait_ready`` task; its result if it finished in the meantime, else ``[]``."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await task
    return []
