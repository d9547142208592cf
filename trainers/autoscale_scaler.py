"""``ReplicaScaler``: applies a policy's ``ScalingRule`` to its replicas behind the gateway.

Two halves, so replica changes never race a train step or a weight push:

- ``sample()`` (every ``interval_s`` from a background task, or by hand in tests) reads the
  policy's queue depth -- the requests on its live replicas, each counted once (``depth``: the
  larger of those in flight through the gateway and the engine's own ``num_pending``) -- and,
  with ``metric="latency"``, the latency quantile of its recent requests (each replica's
  ``generate`` / ``generate_streaming`` is timed, call to result, queueing on the replica
  included, into a ``LatencyWindow``), and updates ``target``;
- ``reconcile()`` (the launcher calls it at each step end) first replaces lost replicas (an
  engine the source reports dead is dropped from routing, and released once its requests in
  flight have ended: they fail with a 503 the agents retry on a live replica), then starts replicas
  up to ``target`` -- each joins through ``join`` (``Trainer.add_replica``: the current weights
  and version are loaded before it is routable) -- or drains and stops replicas down to it:
  a drained replica takes no new request and is stopped once its in-flight requests finished
  (or after ``drain_timeout_s``).

Every ``reconcile`` logs ``autoscale/<policy>/{replicas,target,queue_depth,queue_depth_max}``
(the last sample, and the largest since the previous reconcile), with ``metric="latency"``
also ``latency_s`` (the last sample's quantile; absent while no request ended within the
window), and, when they happened,
``scale_up``, ``scale_down``, ``replaced`` (counts of this reconcile).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from areal_agents.engines.base import InferenceEngine
from areal_agents.gateway.router import Router

from .autoscale import AutoscaleSettings, LatencyWindow, ScalingRule

__all__ = ["ReplicaScaler", "ReplicaSource"]

log = logging.getLogger(__name__)

_TIMING: contextvars.ContextVar[bool] = contextvars.ContextVar("autoscale_timing", default=False)
"""Set inside a timed call: a nested one (``generate_streaming`` calling ``generate``) is not
timed again."""


class ReplicaSource(Protocol):
    """Where a policy's replicas come from (``RayReplicaSet``; fakes in tests)."""

    async def start(self) -> InferenceEngine:
        """A new replica on free resources (any version: ``join`` brings it up to date)."""
        ...

    async def stop(self, engine: InferenceEngine) -> None:
        """Close ``engine`` and release its resources (also for one that is already dead)."""
        ...

    async def alive(self, engine: InferenceEngine) -> bool:
        """Whether ``engine``'s process is still up."""
        ...


class ReplicaScaler:
    """Keeps one policy's live replicas at its ``ScalingRule``'s target (module docstring).

    Args:
        policy: the policy's name (in metric names).
        router: its router (``Gateway.policies[policy].router``).
        source: starts, stops and checks replicas.
        settings: the rule's settings.
        join: makes a started replica routable at the current weights and version
            (``Trainer.add_replica``); returns its router index.
        log: receives each reconcile's metrics.
        clock: seconds, monotonic (tests inject a fake one).
        drain_timeout_s: the most seconds a removed replica is given to finish its requests.
    """

    def __init__(self, policy: str, router: Router, source: ReplicaSource,
                 settings: AutoscaleSettings, *,
                 join: Callable[[InferenceEngine], Awaitable[int]],
                 log: Callable[[dict[str, float]], Any] = lambda metrics: None,
                 clock: Callable[[], float] = time.monotonic,
                 drain_timeout_s: float = 120.0) -> None:
        self.policy, self.router, self.source, self.settings = policy, router, source, settings
        self.rule = ScalingRule(settings)
        self.join, self.log, self.clock = join, log, clock
        self.drain_timeout_s = drain_timeout_s
        self.target = len(router.live_engines())
        self.queue_depth = 0.0
        self.queue_depth_max = 0.0  # since the last reconcile
        self.latencies = LatencyWindow(settings.latency_window_s)
        self.latency_s: float | None = None  # the last sample's quantile (metric "latency")
        self.retired: set[int] = set()  # router indices drained and stopped by this scaler
        self._task: asyncio.Task[None] | None = None
        if settings.metric == "latency":
            for engine in router.engines:
                self._time_requests(engine)

    def _time_requests(self, engine: InferenceEngine) -> None:
        """Record the latency of each of ``engine``'s ``generate`` / ``generate_streaming``
        calls that returns (a failed one measures no service time) in ``latencies``."""
        for name in ("generate", "generate_streaming"):
            call = getattr(engine, name, None)
            if call is None:
                continue

            @functools.wraps(call)
            async def timed(*args: Any, _call: Any = call, **kwargs: Any) -> Any:
                if _TIMING.get():  # within a timed call of the same request
                    return await _call(*args, **kwargs)
                token = _TIMING.set(True)
                try:
                    start = self.clock()
                    result = await _call(*args, **kwargs)
                    end = self.clock()
                finally:
                    _TIMING.reset(token)
                self.latencies.record(end, end - start)
                return result

            setattr(engine, name, timed)

    def live(self) -> list[int]:
        """Router indices of the replicas serving now."""
        return [i for i in range(len(self.router.engines)) if i not in self.router.dead]

    def depth(self, index: int) -> int:
        """Requests on replica ``index``, each counted once: the larger of those in flight
        through the gateway (``Router.load`` less the engine's own count) and the engine's own
        ``num_pending`` (queued or running there, from any client). A request sent through the
        gateway is in both counts (``Router.load`` adds them, which only ranks replicas)."""
        pending = int(self.router.engines[index].num_pending)
        return max(self.router.load(index) - pending, pending)

    def sample(self) -> int:
        """Measure the queue depth now and update ``target``; returns it."""
        now = self.clock()
        self.queue_depth = float(sum(self.depth(i) for i in self.live()))
        self.queue_depth_max = max(self.queue_depth_max, self.queue_depth)
        if self.settings.metric == "latency":
            self.latency_s = self.latencies.quantile(now, self.settings.latency_quantile)
        self.target = self.rule.update(now, self.queue_depth, self.target, self.latency_s)
        return self.target

    def start_sampling(self) -> None:
        """Sample every ``settings.interval_s`` in a background task (needs a running loop)."""
        async def loop() -> None:
            while True:
                self.sample()
                await asyncio.sleep(self.settings.interval_s)

        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(loop())

    async def stop_sampling(self) -> None:
        """Stop the background sampler (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reconcile(self) -> dict[str, float]:
        """Replace lost replicas, then scale to ``target``; returns (and logs) the metrics."""
        name = f"autoscale/{self.policy}"
        events = {"scale_up": 0, "scale_down": 0, "replaced": 0}
        for index in self.live():
            engine = self.router.engines[index]
            if not await self.source.alive(engine):
                log.warning("policy %r: replica %d is lost; replacing it", self.policy, index)
                self.router.mark_dead(index)
                self.retired.add(index)
                await self._wait_idle(index)
                await self.source.stop(engine)
                events["replaced"] += 1
        for index in sorted(self.router.dead - self.retired):  # dropped by the gateway
            if not await self.source.alive(self.router.engines[index]):
                self.retired.add(index)
                await self._wait_idle(index)
                await self.source.stop(self.router.engines[index])
                events["replaced"] += 1
        lost = events["replaced"]
        while len(self.live()) < self.target:
            engine = await self.source.start()
            if self.settings.metric == "latency":
                self._time_requests(engine)
            await self.join(engine)
            if lost:
                lost -= 1
            else:
                events["scale_up"] += 1
        while len(self.live()) > self.target:
            await self._drain_one()
            events["scale_down"] += 1
        metrics = {f"{name}/replicas": float(len(self.live())),
                   f"{name}/target": float(self.target),
                   f"{name}/queue_depth": self.queue_depth,
                   f"{name}/queue_depth_max": self.queue_depth_max}
        if self.latency_s is not None:
            metrics[f"{name}/latency_s"] = self.latency_s
        self.queue_depth_max = self.queue_depth
        metrics.update({f"{name}/{k}": float(v) for k, v in events.items() if v})
        if any(events.values()):
            log.warning("policy %r: replicas %s (target %d)", self.policy,
                        {k: v for k, v in events.items() if v}, self.target)
        self.log(metrics)
        return metrics

    async def _drain_one(self) -> None:
        """Stop routing to the least-loaded replica, wait for its requests, stop it."""
        index = min(self.live(), key=lambda i: (self.router.load(i), -i))
        self.router.mark_dead(index)  # no new requests; in-flight ones finish
        self.retired.add(index)
        await self._wait_idle(index)
        await self.source.stop(self.router.engines[index])

    async def _wait_idle(self, index: int) -> None:
        """Wait (at most ``drain_timeout_s``) until replica ``index`` has no request in flight.

        Before a lost replica is stopped too: its requests in flight then end with the
        gateway's 503 (server unreachable), which the agents retry on a live replica; closing
        its client under them would fail their episodes with a closed-client error instead."""
        deadline = self.clock() + self.drain_timeout_s
        while self.router.load(index) > 0 and self.clock() < deadline:
            await asyncio.sleep(0.05)
