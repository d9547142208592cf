"""examples/arithmetic: the YAML config and run.py (SFT warm start, step-0 eval, GRPO, final eval)."""

from __future__ import annotations

import json

import pytest

from areal_agents.config import load_config

from ._load import EXAMPLES, load_example

CONFIG = EXAMPLES / "arithmetic" / "sft_then_rl.yaml"


def test_config_is_valid_and_uses_the_scripted_solver():
    cfg = load_config(CONFIG)
    assert cfg.env == "Arithmetic-v0"
    assert cfg.trainer.warm_start == {"episodes": 256, "players": {"agent": "arithmetic_solver"}}
    assert cfg.policies["solver"].sft_steps > 0 and cfg.policy_map == {"agent": "solver"}
    assert cfg.policies["solver"].model in ("tiny:xs", "tiny:s")
    assert len(set(cfg.trainer.eval_seeds)) == len(cfg.trainer.eval_seeds) >= 100
    assert cfg.trainer.steps % cfg.trainer.eval_every == 0  # the last step is evaluated


@pytest.mark.slow
async def test_short_run_measures_untrained_sft_and_rl_accuracy(tmp_path):
    run = load_example("arithmetic", "run")
    cfg = load_config(CONFIG, [
        f"run_dir={tmp_path}", "trainer.steps=2", "trainer.eval_every=0",
        "trainer.batch_size=16", "trainer.warm_start.episodes=128",
        "policies.solver.sft_steps=25", "policies.solver.sft_lr=5e-3",
        "logging.progress=false", "logging.tensorboard=false",
        f"trainer.eval_seeds={list(range(2_000_000, 2_000_064))}",
    ])
    result = await run.run(cfg, baseline=True)

    assert result["steps"] == 2 and len(result["history"]) == 2
    assert result["history"][-1]["policy/solver/version"] == 2.0
    for key in ("untrained", "sft", "rl"):
        assert 0.0 <= result[key] <= 1.0
    # the short SFT warm start from the scripted solver beats the seed-initialised model
    assert result["untrained"] == 0.0
    assert result["sft"] > result["untrained"], result
    # step 0 (after the warm start) and the last step are both in the metrics log
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/agent/success"] for r in rows if "eval/agent/success" in r}
    assert evals == {0: result["sft"], 2: result["rl"]}
    assert any("warm_start/solver/nll_last" in r for r in rows)
    summary = json.loads((tmp_path / "accuracy.json").read_text())
    assert summary["sft"] == result["sft"] and summary["rl"] == result["rl"]
    assert summary["eval_seeds"] == 64
