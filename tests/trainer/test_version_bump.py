"""Every train step bumps the train engine's version with the controller's (and the served
engine's), so each engine checkpoint records the version its weights are."""

from __future__ import annotations

import pytest
import torch

from areal_agents.agents import ScriptedAgent
from areal_agents.trainers.fsdp.checkpoint import TRAINER_STATE
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer


@pytest.mark.slow  # two train steps of a tiny model (~15 s on 2 cores)
async def test_fresh_run_engine_versions_follow_the_controller(tmp_path):
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(backend="fsdp", lr=1e-3,
                                    sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(lambda obs: "A")},
        batch_size=4, group_size=2, max_staleness=0, checkpoint_every=1, run_dir=tmp_path,
        progress=False)
    try:
        await trainer.afit(2)
        engine = trainer.train_engines["speaker"]
        served = trainer.gateway.policies["speaker"].router.engines[0]
        assert trainer.controller.controls["speaker"].version == 2
        assert (engine.version, served.version) == (2, 2)
    finally:
        await trainer.aclose()
    for step in (1, 2):
        saved = torch.load(tmp_path / "checkpoints" / f"step_{step}" / "speaker" / TRAINER_STATE,
                           weights_only=False)
        assert (saved["step"], saved["version"]) == (step, step)
