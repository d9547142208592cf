"""The Trainer's launcher hooks with a replica source of in-process engines (no Ray): a
replica the scaler adds at a step end joins through ``Trainer.add_replica`` at the trained
weights and the policy's version, and the launcher is closed with the trainer; a replica lost
with episodes in flight is replaced, its requests retried on the live replica."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
import torch

from areal_agents.agents import ScriptedAgent
from areal_agents.engines.base import GenerateRequest, GenerateResult
from areal_agents.engines.local import LocalEngine
from areal_agents.errors import EngineUnavailable
from areal_agents.models import tiny
from areal_agents.trainers.autoscale import AutoscaleSettings
from areal_agents.trainers.autoscale_scaler import ReplicaScaler
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.ray_launcher import LocalLauncher
from areal_agents.trainers.trainer import Trainer


class _Source:
    """Replicas that are fresh in-process engines on an untrained model (version 0)."""

    def __init__(self) -> None:
        self.started: list[LocalEngine] = []

    async def start(self) -> LocalEngine:
        model, tokenizer = tiny("xs", seed=99)
        self.started.append(LocalEngine(model, tokenizer))
        return self.started[-1]

    async def stop(self, engine: LocalEngine) -> None:
        await engine.close()

    async def alive(self, engine: LocalEngine) -> bool:
        return True


class _ScalingLauncher(LocalLauncher):
    """Keeps the speaker at two replicas (min_replicas=2) through the launcher hooks."""

    def __init__(self) -> None:
        self.source, self.logged, self.closed = _Source(), [], False

    async def attach(self, trainer: Trainer) -> None:
        settings = AutoscaleSettings(min_replicas=2, max_replicas=2)
        self.scaler = ReplicaScaler(
            "speaker", trainer.gateway.policies["speaker"].router, self.source, settings,
            join=functools.partial(trainer.add_replica, "speaker"), log=self.logged.append)

    async def on_step_end(self, trainer: Trainer) -> None:
        self.scaler.sample()
        await self.scaler.reconcile()

    async def close(self) -> None:
        self.closed = True


async def test_a_replica_joined_at_a_step_end_serves_the_trained_weights_and_version():
    launcher = _ScalingLauncher()
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(lr=1e-2, sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(lambda obs: "A")},
        batch_size=4, group_size=2, progress=False, launcher=launcher)
    try:
        await trainer.afit(1)
        router = trainer.gateway.policies["speaker"].router
        first, joined = router.live_engines()
        assert joined is launcher.source.started[0]
        assert (first.version, joined.version, trainer.train_engines["speaker"].version) == \
            (1, 1, 1)
        trained = first.model.state_dict()
        for name, tensor in joined.model.state_dict().items():
            assert torch.equal(tensor, trained[name]), name
        assert launcher.logged[-1]["autoscale/speaker/scale_up"] == 1.0
        assert launcher.logged[-1]["autoscale/speaker/replicas"] == 2.0
    finally:
        await trainer.aclose()
    assert launcher.closed


class _MortalReplica(LocalEngine):
    """An in-process replica that can be lost (as a Ray actor with its node): once ``kill``ed,
    its requests in flight and any later ones raise ``EngineUnavailable`` (what
    ``RemoteEngine`` raises when its server is gone). Counts requests and their versions."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        self.dead, self.in_flight, self.served = False, 0, []

    def kill(self) -> None:
        self.dead = True

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self.dead:
            raise EngineUnavailable("the engine server of this replica is unreachable (its "
                                    "Ray actor died)")
        self.in_flight += 1
        try:
            result = await super().generate(request)
        finally:
            self.in_flight -= 1
        if self.dead:
            raise EngineUnavailable("the engine server of this replica is unreachable (its "
                                    "Ray actor died)")
        self.served.append(self.version)
        return result


class _MortalSource(_Source):
    """Replicas that can be lost; ``alive`` is what ``RayReplicaSet.alive`` reports (False
    once the actor is gone)."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: list[LocalEngine] = []

    async def start(self) -> LocalEngine:
        self.started.append(_MortalReplica(*tiny("xs", seed=99)))
        return self.started[-1]

    async def stop(self, engine: LocalEngine) -> None:
        self.stopped.append(engine)
        await engine.close()

    async def alive(self, engine: LocalEngine) -> bool:
        return not getattr(engine, "dead", False)


async def _kill_when_busy(source: _MortalSource) -> tuple[int, int]:
    """Kill the first started replica as soon as it has requests in flight (an observable
    condition, polled); returns (its requests in flight, its requests served) at the kill."""
    while not source.started or not source.started[0].in_flight:
        await asyncio.sleep(0.001)
    replica = source.started[0]
    replica.kill()
    return replica.in_flight, len(replica.served)


@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_a_lost_replica_s_episodes_in_flight_the_ledger_and_the_run_on_its_replacement(api):
    """Both APIs retry the 503 of the lost replica (``SessionAgent``/``LLMAgent``: up to 3
    attempts), so the episodes in flight on it finish on the live replica: none fails, the
    ledger adds up and the run goes on with the replacement."""
    launcher = _ScalingLauncher()
    launcher.source = source = _MortalSource()
    sampling = {"temperature": 1.0, "max_tokens": 1}
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(lr=1e-2, sampling=sampling, api=api)},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(lambda obs: "A")},
        batch_size=4, group_size=2, max_staleness=1, progress=False, launcher=launcher)
    killer = asyncio.ensure_future(_kill_when_busy(source))
    try:
        await trainer.afit(5)
        in_flight_at_kill, served_before_kill = await asyncio.wait_for(killer, 1)
        counts = trainer.controller.counts()["speaker"]
        router = trainer.gateway.policies["speaker"].router
        first, lost, replacement = router.engines
        assert (lost, replacement) == tuple(source.started) and source.stopped == [lost]
        assert router.live_engines() == [first, replacement]
        assert trainer.step == 5 and replacement.version == first.version == 5
        assert replacement.served and replacement.served[0] >= 2  # joined at the trained version
        assert len(lost.served) == served_before_kill  # it served nothing after its death
    finally:
        killer.cancel()
        await trainer.aclose()
    assert in_flight_at_kill >= 1
    causes = [repr(e) for e in trainer.controller.errors]
    assert len(causes) == counts.get("outcome/failed", 0)
    assert causes == []  # retried on the live replica (a lost one fails nothing)
    outcomes = sum(v for k, v in counts.items() if k.startswith("outcome/"))
    assert counts["submitted"] == outcomes + counts["running"] + counts["waiting"] + \
        counts["buffered"]
    assert counts["outcome/trained"] >= 5 * 4
    replaced = [m for m in launcher.logged if "autoscale/speaker/replaced" in m]
    assert [m["autoscale/speaker/replaced"] for m in replaced] == [1.0]
    assert launcher.logged[-1]["autoscale/speaker/replicas"] == 2.0
