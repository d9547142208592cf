"""Auto-scaling without Ray: the pure ``ScalingRule`` and ``ReplicaScaler`` on fake replicas
(a synthetic queue, an injected clock, a real ``Router``)."""

from __future__ import annotations

import asyncio

import pytest

from areal_agents.errors import ConfigError
from areal_agents.gateway.router import Router
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.autoscale import AutoscaleSettings, LatencyWindow, ScalingRule
from areal_agents.trainers.autoscale_scaler import ReplicaScaler

FAST = {"scale_up_queue": 4, "scale_down_queue": 1, "up_after_s": 2, "down_after_s": 5,
        "cooldown_s": 3}


def _run(rule: ScalingRule, samples: list[tuple[float, float]], n: int = 1) -> list[int]:
    out = []
    for now, depth in samples:
        n = rule.update(now, depth, n)
        out.append(n)
    return out


def test_scale_up_only_after_the_high_queue_lasted_up_after_s():
    rule = ScalingRule(AutoscaleSettings(min_replicas=1, max_replicas=3, **FAST))
    # 8 requests on 1 replica from t=0; up_after_s=2 -> the change comes at t=2; a fresh
    # window on 2 replicas (load 4 >= 4) starts at t=3, and the cooldown (3 s) holds the next
    # change until t=5
    assert _run(rule, [(t, 8) for t in range(9)]) == [1, 1, 2, 2, 2, 3, 3, 3, 3]


def test_a_queue_oscillating_across_the_threshold_never_scales():
    rule = ScalingRule(AutoscaleSettings(min_replicas=1, max_replicas=3, **FAST))
    # high and low alternate every second: no window lasts 2 s
    assert _run(rule, [(t, 8 if t % 2 else 2) for t in range(20)]) == [1] * 20


def test_the_hysteresis_band_neither_scales_up_nor_down():
    rule = ScalingRule(AutoscaleSettings(min_replicas=1, max_replicas=3, **FAST))
    # 2 replicas with 5 requests: 2.5 per replica, between down (1) and up (4)
    assert _run(rule, [(t, 5) for t in range(30)], n=2) == [2] * 30


def test_scale_down_after_the_low_queue_lasted_down_after_s_never_below_min():
    rule = ScalingRule(AutoscaleSettings(min_replicas=1, max_replicas=3, **FAST))
    # down at t=5; cooldown 3 s, fresh window from t=6 -> down again at t=11; min 1 holds
    assert _run(rule, [(t, 0) for t in range(16)], n=3) == [3] * 5 + [2] * 6 + [1] * 5


def test_counts_outside_the_bounds_return_to_them_at_once():
    rule = ScalingRule(AutoscaleSettings(min_replicas=2, max_replicas=3, **FAST))
    assert rule.update(0.0, 0, 0) == 2
    assert rule.update(0.5, 0, 7) == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_replicas": 0}, "autoscale.min_replicas must be an integer >= 1, got 0"),
    ({"min_replicas": 3, "max_replicas": 2},
     "autoscale.max_replicas=2 must be an integer >= min_replicas=3"),
    ({"scale_up_queue": 2, "scale_down_queue": 2},
     "autoscale: scale_down_queue=2 must be below scale_up_queue=2 (the gap is the "
     "hysteresis band); lower scale_down_queue"),
])
def test_invalid_settings_name_the_field(kwargs, message):
    with pytest.raises(ConfigError) as err:
        AutoscaleSettings(**kwargs)
    assert str(err.value) == message


def test_unknown_settings_fields_are_named():
    with pytest.raises(ConfigError, match=r"autoscale.listener: unknown field\(s\) \['max'\]"):
        AutoscaleSettings.of({"max": 2}, "listener")


class _Source:
    """Replicas that start at version 0 and can be 'lost'."""

    def __init__(self) -> None:
        self.started: list[ScriptedEngine] = []
        self.stopped: list[ScriptedEngine] = []
        self.lost: set[int] = set()

    async def start(self) -> ScriptedEngine:
        engine = ScriptedEngine()
        self.started.append(engine)
        return engine

    async def stop(self, engine: ScriptedEngine) -> None:
        self.stopped.append(engine)

    async def alive(self, engine: ScriptedEngine) -> bool:
        return id(engine) not in self.lost


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _scaler(router: Router, source: _Source, clock: _Clock, logged: list, version: int = 5):
    async def join(engine: ScriptedEngine) -> int:  # Trainer.add_replica's contract
        engine.version = version
        return router.add(engine)

    settings = AutoscaleSettings(min_replicas=1, max_replicas=3, **FAST)
    return ReplicaScaler("listener", router, source, settings, join=join, log=logged.append,
                         clock=clock)


async def test_scaler_scales_up_under_a_synthetic_queue_and_down_after_draining():
    first = ScriptedEngine()
    router, source, clock, logged = Router([first]), _Source(), _Clock(), []
    scaler = _scaler(router, source, clock, logged)
    held = [router.acquire()[0] for _ in range(8)]  # 8 requests in flight on replica 0
    for t in range(3):
        clock.now = float(t)
        scaler.sample()
    metrics = await scaler.reconcile()
    assert metrics == {"autoscale/listener/replicas": 2.0, "autoscale/listener/target": 2.0,
                       "autoscale/listener/queue_depth": 8.0,
                       "autoscale/listener/queue_depth_max": 8.0,
                       "autoscale/listener/scale_up": 1.0}
    assert len(source.started) == 1 and source.started[0].version == 5  # joined, current version
    assert router.live_engines() == [first, source.started[0]]
    # the queue empties except one request still running on replica 0; after the cooldown and
    # down_after_s the scaler wants one replica again and drains the least loaded (replica 1)
    for index in held[1:]:
        router.release(index)
    for t in range(3, 12):
        clock.now = float(t)
        scaler.sample()
    assert scaler.target == 1
    metrics = await scaler.reconcile()
    assert metrics["autoscale/listener/scale_down"] == 1.0
    assert metrics["autoscale/listener/queue_depth"] == 1.0  # the last sample
    assert metrics["autoscale/listener/queue_depth_max"] == 8.0  # the peak since step end

    assert source.stopped == [source.started[0]] and router.live_engines() == [first]
    assert logged[-1] == metrics


async def test_a_removed_replica_is_stopped_only_once_its_requests_finished():
    engines = [ScriptedEngine(), ScriptedEngine()]
    router, source, clock, logged = Router(engines), _Source(), _Clock(), []
    scaler = _scaler(router, source, clock, logged)
    busy, _ = router.acquire()  # one request in flight on replica 0
    assert busy == 0
    scaler.target = 1
    await scaler.reconcile()  # the least-loaded replica (1, idle) is drained: stopped at once
    assert source.stopped == [engines[1]]
    task = asyncio.ensure_future(scaler._drain_one())  # now the busy one
    await asyncio.sleep(0.2)
    assert not task.done() and router.live_engines() == []  # no new requests, still running
    router.release(busy)
    await asyncio.wait_for(task, 5)
    assert source.stopped == [engines[1], engines[0]]


async def test_a_lost_replica_is_replaced_at_the_current_version():
    engines = [ScriptedEngine(), ScriptedEngine()]
    router, source, clock, logged = Router(engines), _Source(), _Clock(), []
    scaler = _scaler(router, source, clock, logged, version=7)
    source.lost.add(id(engines[1]))
    metrics = await scaler.reconcile()
    assert metrics["autoscale/listener/replaced"] == 1.0
    assert "autoscale/listener/scale_up" not in metrics
    assert source.stopped == [engines[1]]
    assert router.live_engines() == [engines[0], source.started[0]]
    assert source.started[0].version == 7
    # a replica the gateway already dropped (its server died mid-request) is replaced too
    router.mark_dead(0)
    source.lost.add(id(engines[0]))
    metrics = await scaler.reconcile()
    assert metrics["autoscale/listener/replaced"] == 1.0
    assert len(router.live_engines()) == 2


class _Counting(ScriptedEngine):
    """An engine that counts the requests queued or running on it (as ``LocalEngine`` and
    ``RemoteEngine`` do), whoever sent them."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = 0

    @property
    def num_pending(self) -> int:
        return self.pending


async def test_the_queue_depth_counts_a_request_through_the_gateway_once():
    engine = _Counting()
    router, source, clock, logged = Router([engine]), _Source(), _Clock(), []
    scaler = _scaler(router, source, clock, logged)
    for _ in range(6):  # six requests through the gateway, each also pending in the engine
        router.acquire()
        engine.pending += 1
    assert router.load(0) == 12  # the router's ranking adds both counts
    scaler.sample()
    assert scaler.queue_depth == 6.0
    engine.pending += 3  # three more from another client, straight to the engine
    scaler.sample()
    assert scaler.queue_depth == 9.0


async def test_a_lost_replica_is_stopped_only_once_its_requests_in_flight_ended():
    engines = [ScriptedEngine(), ScriptedEngine()]
    router, source, clock, logged = Router(engines), _Source(), _Clock(), []
    scaler = _scaler(router, source, clock, logged)
    router.acquire()  # replica 0
    busy, _ = router.acquire()  # replica 1: in flight when its server is lost
    assert busy == 1
    source.lost.add(id(engines[1]))
    task = asyncio.ensure_future(scaler.reconcile())
    await asyncio.sleep(0.2)
    assert not task.done() and source.stopped == []  # its client stays open for the request
    assert router.live_engines() == [engines[0]]  # but it takes no new request
    router.release(busy)  # the request ended (with the gateway's 503, retried elsewhere)
    metrics = await asyncio.wait_for(task, 5)
    assert source.stopped == [engines[1]] and metrics["autoscale/listener/replaced"] == 1.0


LATENCY = {"metric": "latency", "scale_up_latency_s": 2.0, "scale_down_latency_s": 0.5,
           "up_after_s": 2, "down_after_s": 5, "cooldown_s": 3}


def _run_latency(rule: ScalingRule, samples: list[tuple[float, float | None]], n: int = 1,
                 depth: float = 4) -> list[int]:
    out = []
    for now, latency in samples:
        n = rule.update(now, depth, n, latency)
        out.append(n)
    return out


def test_latency_rule_scales_up_only_after_the_high_latency_lasted_up_after_s():
    rule = ScalingRule(AutoscaleSettings(min_replicas=1, max_replicas=3, **LATENCY))
    # 3 s at or above 2 s from t=0: up at t=2; fresh window from t=3, cooldown until t=5
    assert _run_latency(rule, [(t, 3.0) for t in range(9)]) == [1, 1, 2, 2, 2, 3, 3, 3, 3]


def test_latency_inside_the_band_or_oscillating_holds_the_count():
    rule = ScalingRule(AutoscaleSettings(min_replicas=1, max_replicas=3, **LATENCY))
    # between down (0.5 s) and up (2 s), also with a deep queue (the queue is not the metric)
    assert _run_latency(rule, [(t, 1.0) for t in range(30)], n=2, depth=100) == [2] * 30
    # above and below the band in turn: no window lasts
    assert _run_latency(rule, [(t, 3.0 if t % 2 else 0.1) for t in range(30)], n=2) == [2] * 30


def test_latency_rule_scales_down_after_the_cooldown_never_below_min():
    rule = ScalingRule(AutoscaleSettings(min_replicas=1, max_replicas=3, **LATENCY))
    # up at t=2 (high for 2 s), then fast: the low window starts at t=3 but the cooldown
    # (3 s from t=2) and down_after_s (5 s) hold the change until t=8; next one at t=14
    samples = [(t, 3.0) for t in range(3)] + [(t, 0.2) for t in range(3, 20)]
    assert _run_latency(rule, samples, n=2) == [2, 2, 3] + [3] * 5 + [2] * 6 + [1] * 6


def test_no_finished_request_is_low_latency_only_when_nothing_is_queued():
    rule = ScalingRule(AutoscaleSettings(min_replicas=1, max_replicas=3, **LATENCY))
    # requests queued but none ended within the window (stuck or slow): hold
    assert _run_latency(rule, [(t, None) for t in range(20)], n=2, depth=6) == [2] * 20
    # idle: scales down after down_after_s
    assert _run_latency(rule, [(t, None) for t in range(20, 27)], n=2, depth=0) == \
        [2] * 5 + [1] * 2


def test_latency_window_keeps_the_last_window_s_and_takes_nearest_rank_quantiles():
    window = LatencyWindow(window_s=10.0)
    assert window.quantile(0.0, 0.9) is None
    for t, latency in enumerate([5.0, 1.0, 2.0, 4.0, 3.0]):
        window.record(float(t), latency)
    assert [window.quantile(4.0, q) for q in (0.2, 0.5, 0.9, 1.0)] == [1.0, 3.0, 5.0, 5.0]
    assert window.quantile(11.0, 0.5) == 3.0  # t=0 and t=1 fell out: [2, 4, 3]
    assert len(window) == 3
    assert window.quantile(14.0, 0.5) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"metric": "p90"}, "autoscale.metric='p90'; choose one of ['queue', 'latency']"),
    ({"scale_up_latency_s": 1.0, "scale_down_latency_s": 1.0},
     "autoscale: scale_down_latency_s=1.0 must be below scale_up_latency_s=1.0 (the gap is "
     "the hysteresis band); lower scale_down_latency_s"),
    ({"latency_quantile": 0}, "autoscale.latency_quantile must be in (0, 1], got 0"),
    ({"latency_window_s": 0}, "autoscale.latency_window_s must be > 0, got 0"),
])
def test_invalid_latency_settings_name_the_field(kwargs, message):
    with pytest.raises(ConfigError) as err:
        AutoscaleSettings(**kwargs)
    assert str(err.value) == message


class _Slow(ScriptedEngine):
    """An engine whose requests take ``delay`` seconds of the test's clock."""

    def __init__(self, clock: _Clock, delay: float) -> None:
        super().__init__()
        self.clock, self.delay = clock, delay

    async def generate(self, request):  # type: ignore[override]
        self.clock.now += self.delay
        return await super().generate(request)


async def test_scaler_scales_on_measured_request_latency():
    from areal_agents.engines import GenerateRequest, SamplingParams

    clock = _Clock()
    first = _Slow(clock, 3.0)  # slow: each request takes 3 s
    router, source, logged = Router([first]), _Source(), []

    async def join(engine: ScriptedEngine) -> int:
        return router.add(engine)

    settings = AutoscaleSettings(min_replicas=1, max_replicas=2, latency_window_s=5.0,
                                 latency_quantile=0.5, **LATENCY)
    scaler = ReplicaScaler("listener", router, source, settings, join=join, log=logged.append,
                           clock=clock)
    request = GenerateRequest([1, 2], SamplingParams(max_tokens=1))
    for _ in range(3):  # t = 3, 6, 9: each request measured at 3 s
        await router.engines[0].generate(request)
        scaler.sample()
    assert scaler.latency_s == 3.0 and scaler.target == 2  # high from t=3 to t=9 (>= 2 s)
    metrics = await scaler.reconcile()
    assert metrics["autoscale/listener/scale_up"] == 1.0
    assert metrics["autoscale/listener/latency_s"] == 3.0
    joined = source.started[0]
    assert router.live_engines() == [first, joined]
    await joined.generate(request)  # the joined replica is timed too: 0 s here
    assert scaler.latencies.quantile(clock.now, 0.0 + 1e-9) == 0.0
    timed = len(scaler.latencies)
    await joined.generate_streaming(request, lambda delta: None)  # calls generate inside
    assert len(scaler.latencies) == timed + 1  # one request, timed once
    # the window empties, nothing queued: idle, so after cooldown and down_after_s, down
    for t in range(10, 30):
        clock.now = float(t)
        scaler.sample()
    assert scaler.latency_s is None and scaler.target == 1
    metrics = await scaler.reconcile()
    assert metrics["autoscale/listener/scale_down"] == 1.0
    assert "autoscale/listener/latency_s" not in metrics
