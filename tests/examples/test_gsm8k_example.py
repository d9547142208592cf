"""examples/gsm8k: the shipped data, the CPU recipe (run at tiny size through the CLI) and the
placement of the GPU recipes (loaded and checked; no GPU here)."""

from __future__ import annotations

import json

import pytest

from areal_agents import cli
from areal_agents.agents.players import math_expression_solver
from areal_agents.config import load_config
from areal_agents.envs.dataset import DatasetEnv
from areal_agents.trainers.policy import Policy

from ._load import EXAMPLES, load_example

pytest.importorskip("math_verify", reason="the recipes' reward is the math verifier ([math])")

HERE = EXAMPLES / "gsm8k"
CPU = HERE / "cpu_tiny.yaml"
GSM8K_ROW = {"question": "Tom has 3 bags of 4 apples. How many apples?",
             "answer": "3 * 4 = <<3*4=12>>12\n#### 12"}


def test_shipped_data_is_what_make_data_writes():
    rows = [json.loads(line) for line in (HERE / "data" / "arithmetic.jsonl").open()]
    assert rows == load_example("gsm8k", "make_data").rows()
    assert len(rows) == 800 and rows[1] == {"question": "Compute 0 + 0.",
                                            "answer": "0 + 0 = 0\n#### 0"}


def test_cpu_recipe_holds_out_its_eval_rows():
    cfg = load_config(CPU)
    assert cfg.env == "Dataset-v0" and cfg.env_kwargs["verifier"] == "math"
    assert cfg.policies["solver"].model == "tiny:xs"
    eval_size, start = cfg.env_kwargs["eval_size"], 1_000_000  # DatasetEnv's eval_seed_start
    assert sorted(cfg.trainer.eval_seeds) == list(range(start, start + eval_size))
    demo = cfg.trainer.warm_start
    assert demo["players"] == {"agent": "math_expression_solver"}
    assert demo["seed"] + demo["episodes"] <= start  # demonstrations never see an eval row
    assert cfg.trainer.steps % cfg.trainer.eval_every == 0  # the last step is evaluated


async def test_cpu_recipe_eval_rows_are_never_trained_on_and_the_solver_scores_1(monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    kwargs = load_config(CPU).env_kwargs
    env = DatasetEnv(**kwargs)
    seen = {env.seeds.row(s, "seed") for s in range(0, 5000)}
    held_out = {env.seeds.row(1_000_000 + i, "seed") for i in range(kwargs["eval_size"])}
    assert len(held_out) == 200 and not seen & held_out
    obs, _ = await env.reset(seed=1_000_003)
    assert obs[0]["content"].startswith("Compute the result. Reply 'Answer: <number>'.\n")
    _, reward, done, _, info = await env.step(math_expression_solver(obs))
    assert (reward, done, info["success"]) == (1.0, True, True)


def test_cpu_recipe_demonstrations_reach_the_facts_of_held_out_rows(monkeypatch):
    """800 demonstrations visit 529 of the 600 training rows; only 8 held-out questions ask
    a sum or difference that no demonstration shows (256 demonstrations left 65 such rows,
    and the warm-started model could not answer them)."""
    monkeypatch.chdir(EXAMPLES.parent)
    cfg = load_config(CPU)
    env = DatasetEnv(**cfg.env_kwargs)
    demo = cfg.trainer.warm_start
    demo_rows = {env.seeds.row(s, "seed") for s in range(demo["seed"], demo["seed"] + 800)}
    assert demo["episodes"] == 800 and len(demo_rows) == 529

    def fact(row: int) -> str:  # "3 - 7" from "3 - 7 = -4\n#### -4"
        return env.data.rows[row]["answer"].split(" = ")[0]

    demo_facts = {fact(r) for r in demo_rows}
    assert sum(fact(r) not in demo_facts for r in env.seeds.eval_rows) == 8


@pytest.mark.slow
def test_cpu_recipe_runs_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(EXAMPLES.parent)  # the YAML's data path is relative to the repo root
    code = cli.main(["train", str(CPU), f"run_dir={tmp_path}", "trainer.steps=2",
                     "trainer.eval_every=2", "trainer.batch_size=8",
                     "trainer.warm_start.episodes=16", "policies.solver.sft_steps=3",
                     f"trainer.eval_seeds={list(range(1_000_000, 1_000_004))}",
                     "logging.progress=false", "logging.tensorboard=false"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2
    assert [r["step"] for r in rows if "eval/agent/success" in r][-1] == 2
    assert any("warm_start/solver/nll_last" in r for r in rows)
    assert '"steps": 2' in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qwen3_0p6b_1gpu", "qwen3_0p6b_8gpu"])
def test_gpu_recipes_validate_and_render_gsm8k(name):
    cfg = load_config(HERE / f"{name}.yaml")
    spec = cfg.policies["solver"]
    policy = Policy(**spec.model_dump())  # the placement checks a Policy runs
    assert policy.model == "Qwen/Qwen3-0.6B" and policy.backend == "fsdp"
    assert policy.inference.kind == "vllm" and policy.inference.resolved_transport() == "disk"
    assert policy.inference.server_args["dtype"] == "bfloat16"
    kwargs = {k: v for k, v in cfg.env_kwargs.items() if k not in ("path", "eval_size")}
    env = DatasetEnv(rows=[GSM8K_ROW] * 3, eval_size=1, **kwargs)
    assert env.answers[0] == "12"
    assert env.prompts[0].endswith("put your final answer within \\boxed{}.")
    assert env.verifier.verify(r"so \boxed{12}", "12").score == 1.0


def _gpus(cuda_visible_devices: str) -> set[int]:
    return {int(i) for i in cuda_visible_devices.split(",")}


def test_one_gpu_recipe_shares_the_device():
    spec = load_config(HERE / "qwen3_0p6b_1gpu.yaml").policies["solver"]
    assert spec.train.world_size == 1 and spec.train.device == "cuda"  # trains on cuda:0
    server = spec.inference.server_args
    assert spec.inference.replicas == 1 and _gpus(server["env"]["CUDA_VISIBLE_DEVICES"]) == {0}
    flags = server["server_args"]
    memory = float(flags[flags.index("--gpu-memory-utilization") + 1])
    assert memory <= 0.5  # vLLM leaves the larger part of the GPU to training


def test_eight_gpu_recipe_trains_on_four_and_serves_on_the_other_four():
    spec = load_config(HERE / "qwen3_0p6b_8gpu.yaml").policies["solver"]
    train_gpus = {rank % 8 for rank in range(spec.train.world_size)}  # rank r -> cuda:r % 8
    assert spec.train.world_size == spec.train.dp == 4 and train_gpus == {0, 1, 2, 3}
    server = spec.inference.server_args
    serve_gpus = _gpus(server["env"]["CUDA_VISIBLE_DEVICES"])
    flags = server["server_args"]
    data_parallel = int(flags[flags.index("--data-parallel-size") + 1])
    assert serve_gpus == {4, 5, 6, 7} and data_parallel == len(serve_gpus) == 4
    assert not train_gpus & serve_gpus
