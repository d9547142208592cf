"""The Trainer's launcher hooks with a replica source of in-process engines (no Ray): a
replica the scaler adds at a step end joins through ``Trainer.add_replica`` at the trained
weights and the policy's version, and the launcher is closed with the trainer."""

from __future__ import annotations

import functools

import torch

from areal_agents.agents import ScriptedAgent
from areal_agents.engines.local import LocalEngine
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
