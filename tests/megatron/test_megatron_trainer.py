"""``Policy(backend="megatron")`` in the Trainer: steps, weight pushes, checkpoint and resume."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from areal_agents.agents import ScriptedAgent
from areal_agents.trainers.megatron import MegatronEngine
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer


def listener(observation):
    return "A"


def make(run_dir, resume=False):
    return Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(backend="megatron", lr=1e-3,
                                    sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(listener)},
        batch_size=4, group_size=2, max_staleness=0, checkpoint_every=1,
        run_dir=run_dir, resume=resume, progress=False)


async def test_trainer_trains_pushes_and_resumes_a_megatron_policy(tmp_path):
    first = make(tmp_path)
    try:
        await first.afit(2)
        engine = first.train_engines["speaker"]
        assert isinstance(engine, MegatronEngine)
        assert (engine.step, engine.version) == (2, 2)
        weights = {n: t.clone() for n, t in engine.export_weights()}
        serving = first.gateway.policies["speaker"].router.engines[0]
        assert serving.version == 2
        served = serving.model.state_dict()
        for name, t in weights.items():  # the engines serve exactly the trained weights
            torch.testing.assert_close(served[name], t, atol=0, rtol=0)
    finally:
        await first.aclose()
    assert all("policy/speaker/version" in r for r in first.history[-1:])

    second = make(tmp_path, resume=True)
    try:
        await second.setup()
        engine = second.train_engines["speaker"]
        assert (engine.step, engine.version) == (2, 2)
        for name, t in engine.export_weights():
            torch.testing.assert_close(t, weights[name], atol=0, rtol=0)
        await second.afit(3)
        assert engine.step == 3
    finally:
        await second.aclose()
