"""A fresh run evaluates its starting policies (after the warm start) and logs them as step 0."""

from __future__ import annotations

import json

from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

SAMPLING = {"temperature": 1.0, "max_tokens": 1}


def make(run_dir, eval_every):
    return Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"s": Policy(lr=3e-3, sampling=SAMPLING, api="completions"),
                  "l": Policy(lr=3e-3, seed=1, sampling=SAMPLING, api="completions")},
        policy_map={"speaker": "s", "listener": "l"}, batch_size=4, group_size=2,
        eval_every=eval_every, eval_seeds=range(100, 108), run_dir=run_dir, progress=False)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


async def test_step_zero_eval_is_logged_before_training(tmp_path):
    trainer = make(tmp_path, eval_every=2)
    try:
        history = await trainer.afit(2)
    finally:
        await trainer.aclose()
    logged = rows(tmp_path)
    start = [r for r in logged if r["step"] == 0 and "eval/speaker/success" in r]
    assert len(start) == 1
    assert 0.0 <= start[0]["eval/speaker/success"] <= 1.0
    assert start[0]["eval/speaker/success"] == start[0]["eval/listener/success"]  # shared reward
    assert [h["step"] for h in history] == [1, 2]  # history holds training steps only
    assert "eval/speaker/success" in history[-1]


async def test_no_eval_when_eval_every_is_zero(tmp_path):
    trainer = make(tmp_path, eval_every=0)
    try:
        await trainer.afit(1)
    finally:
        await trainer.aclose()
    assert not any(k.startswith("eval/") for r in rows(tmp_path) for k in r)
