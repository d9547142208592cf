"""examples/code: the data file, the scripted solver through Dataset-v0 and the code verifier,
and the recipe at tiny size (SFT warm start, step-0 eval, GRPO steps, final eval)."""

from __future__ import annotations

import json

import pytest

import areal_agents as aa
from areal_agents.config import load_config

from ._load import EXAMPLES, load_example

CONFIG = EXAMPLES / "code" / "cpu_tiny.yaml"
DATA = EXAMPLES / "code" / "data" / "functions.jsonl"


def test_shipped_data_is_what_make_data_writes():
    rows = load_example("code", "make_data").rows()
    assert [json.loads(line) for line in DATA.read_text().splitlines()] == rows
    assert len(rows) == 243 and rows[0]["tests"] == [
        "assert f(0) == 1", "assert f(2) == 3", "assert f(5) == 6"]


def test_config_is_valid_and_uses_the_code_verifier():
    cfg = load_config(CONFIG)
    assert (cfg.env, cfg.env_kwargs["verifier"], cfg.env_kwargs["answer_field"]) == (
        "Dataset-v0", "code", "tests")
    assert cfg.trainer.warm_start["players"] == {"agent": "solver:code_solver"}
    assert cfg.policies["coder"].model == "tiny:xs"
    assert len(set(cfg.trainer.eval_seeds)) == len(cfg.trainer.eval_seeds) == 24
    assert cfg.trainer.steps % cfg.trainer.eval_every == 0  # the last step is evaluated


async def test_scripted_solver_passes_the_sandboxed_tests_and_a_random_action_does_not():
    solver = load_example("code", "solver").code_solver
    kwargs = load_config(CONFIG).env_kwargs
    env = aa.make("Dataset-v0", **{**kwargs, "path": str(DATA)})
    for seed in (0, 7, 1_000_000, 1_000_005):  # training and held-out tasks
        obs, _ = await env.reset(seed=seed)
        _, reward, done, _, info = await env.step(solver(obs))
        assert (reward, done, info["verdict_reason"]) == (1.0, True, "all 3 tests passed")
    await env.reset(seed=3)
    _, reward, _, _, info = await env.step("def f(x): return 0")
    assert reward < 1.0 and info["verdict_reason"].startswith(
        ("0 of 3 tests passed", "1 of 3 tests passed", "2 of 3 tests passed"))


@pytest.mark.slow
async def test_tiny_run_measures_untrained_sft_and_rl_success(tmp_path):
    load_example("code", "solver")  # puts examples/code on sys.path for "solver:code_solver"
    run = load_example("arithmetic", "run")
    cfg = load_config(CONFIG, [
        f"run_dir={tmp_path}", f"env_kwargs.path={DATA}", "trainer.steps=2",
        "trainer.eval_every=0", "trainer.batch_size=8", "trainer.warm_start.episodes=32",
        "policies.coder.sft_steps=5", "logging.progress=false", "logging.tensorboard=false",
        f"trainer.eval_seeds={list(range(1_000_000, 1_000_004))}",
    ])
    result = await run.run(cfg, baseline=True)

    assert result["steps"] == 2 and result["history"][-1]["policy/coder/version"] == 2.0
    for key in ("untrained", "sft", "rl"):
        assert 0.0 <= result[key] <= 1.0
    assert any("warm_start/coder/nll_last" in json.loads(line)
               for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert json.loads((tmp_path / "accuracy.json").read_text())["eval_seeds"] == 4
