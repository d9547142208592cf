"""Checkpoint + resume: versions, weights, data cursor; no batch lost or trained twice."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from areal_agents.agents import ScriptedAgent
from areal_agents.errors import ConfigError, TrainError
from areal_agents.trainers.checkpointing import latest_checkpoint
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer


def listener(observation):
    return "A"


def make(run_dir, resume=False, staleness=0, keep=None):
    return Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(lr=1e-3, sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(listener)},
        batch_size=4, group_size=2, max_staleness=staleness, checkpoint_every=1,
        run_dir=run_dir, resume=resume, progress=False, keep_checkpoints=keep)


async def test_killed_run_resumes_without_losing_or_repeating_batches(tmp_path):
    first = make(tmp_path, staleness=1)
    try:
        await first.afit(2)
        weights = {n: t.clone() for n, t in first.train_engines["speaker"].export_weights()}
    finally:
        await first.aclose()  # the in-flight groups of step 3 die with the process
    assert [len(s) for s in first.trained_seeds] == [2, 2]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_2"
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "policy/speaker/version" in r] == [1, 2]

    second = make(tmp_path, resume=True, staleness=1)
    try:
        await second.setup()
        assert second.step == 2
        engine = second.train_engines["speaker"]
        assert engine.version == 2
        for name, t in engine.export_weights():
            torch.testing.assert_close(t, weights[name])
        serving = second.gateway.policies["speaker"].router.engines[0]
        assert serving.version == 2
        control = second.controller.controls["speaker"]
        assert control.capacity() == (1 + 2 + 1) * 4 - 2 * 4  # rebased: nothing in flight
        await second.afit(4)
    finally:
        await second.aclose()
    trained = [s for step in second.trained_seeds for s in step]
    assert len(second.trained_seeds) == 4
    assert len(trained) == len(set(trained)) == 8  # no task seed trained twice
    assert second.trained_seeds[:2] == first.trained_seeds
    assert max(trained) < 4 * 4  # the cursor replays unfinished seeds instead of skipping
    assert second.history[-1]["policy/speaker/version"] == 4


async def test_a_checkpoint_interrupted_mid_save_is_never_picked_up(tmp_path):
    first = make(tmp_path)
    try:
        await first.afit(2)
        engine = first.train_engines["speaker"]
        save = engine.save

        def dies_mid_save(path):  # the engine's files are half written when the process dies
            save(path)
            raise KeyboardInterrupt("killed while saving")

        engine.save = dies_mid_save
        with pytest.raises(KeyboardInterrupt):
            await first.afit(3)
    finally:
        await first.aclose()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_2"
    assert (root / "step_3.partial" / "speaker").is_dir() and not (root / "step_3").exists()

    second = make(tmp_path, resume=True)
    try:
        await second.setup()
        assert second.step == 2 and second.train_engines["speaker"].version == 2
        saved = torch.load(root / "step_2" / "rng.pt", weights_only=False)
        assert torch.equal(torch.get_rng_state(), saved["torch"])  # restored last, after the
        assert random.getstate() == saved["python"]  # engines and the warm start
        assert np.array_equal(np.random.get_state()[1], saved["numpy"][1])
        await second.afit(3)
    finally:
        await second.aclose()
    assert (root / "latest").read_text() == "step_3"
    assert (root / "step_3" / "trainer_state.json").exists()
    assert not (root / "step_3.partial").exists()  # the stale partial save was replaced
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # the interrupted run's step-3 row is dropped

    (root / "latest").write_text("step_9")
    with pytest.raises(TrainError, match=r"step_9, which has no trainer_state\.json"):
        latest_checkpoint(tmp_path)


async def test_keep_checkpoints_keeps_the_newest(tmp_path):
    trainer = make(tmp_path, keep=2)
    try:
        await trainer.afit(3)
    finally:
        await trainer.aclose()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_2", "step_3"]
    assert (root / "latest").read_text() == "step_3"
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 1"):
        make(tmp_path, keep=0)
