"""Checkpoint + resume: versions, weights, data cursor; no batch lost or trained twice."""

from __future__ import annotations

import json

import torch
from areal_agents.agents import ScriptedAgent
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer


def listener(observation):
    return "A"


def make(run_dir, resume=False, staleness=0):
    return Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(lr=1e-3, sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(listener)},
        batch_size=4, group_size=2, max_staleness=staleness, checkpoint_every=1,
        run_dir=run_dir, resume=resume, progress=False)


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
