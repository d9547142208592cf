"""Metric loggers (JSONL, W&B with a fake ``wandb`` module) and the plot/train CLI."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest

from areal_agents.cli import build_parser
from areal_agents.cli_train import plot_run, read_metrics
from areal_agents.config import parse_config
from areal_agents.metrics import JSONLLogger, MultiLogger, NullLogger, make_logger


def test_jsonl_logger_writes_finite_scalars(tmp_path):
    logger = JSONLLogger(tmp_path / "m.jsonl")
    logger.log(1, {"a": 1.5, "b": float("nan"), "c": "text", "d": 2})
    logger.close()
    row = json.loads((tmp_path / "m.jsonl").read_text())
    assert row["step"] == 1 and row["a"] == 1.5 and row["d"] == 2.0
    assert "b" not in row and "c" not in row


def test_make_logger_defaults(tmp_path):
    assert isinstance(make_logger(None), NullLogger)
    logger = make_logger(tmp_path, tensorboard=False)
    assert isinstance(logger, MultiLogger) and len(logger.loggers) == 1
    logger.close()


def test_plot_writes_png_of_per_agent_success(tmp_path):
    logger = JSONLLogger(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        logger.log(step, {"train/speaker/success": step / 5, "train/listener/success": step / 5,
                          "eval/speaker/success": 0.5})
    logger.close()
    assert len(read_metrics(tmp_path)) == 5
    png = plot_run(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="train first"):
        plot_run(tmp_path / "missing")


def test_cli_registers_train_eval_plot():
    parser = build_parser()
    args = parser.parse_args(["train", "cfg.yaml", "trainer.steps=3", "--resume"])
    assert args.config == "cfg.yaml" and args.overrides == ["trainer.steps=3"] and args.resume
    assert parser.parse_args(["plot", "runs/x"]).run_dir == "runs/x"
    assert parser.parse_args(["eval", "runs/x"]).target == "runs/x"


class FakeRun:
    def __init__(self, kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe find_spec
    module.runs = []

    def init(**kwargs):
        module.runs.append(FakeRun(kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_logger_init_args_values_steps_and_resumed_id(tmp_path, fake_wandb):
    logger = make_logger(tmp_path / "run1", tensorboard=False, wandb_project="proj",
                         config={"lr": 0.1}, wandb_entity="team")
    logger.log(3, {"loss": 0.5, "bad": float("nan"), "text": "x"})
    logger.log(4, {"loss": 0.25})
    logger.close()
    run = fake_wandb.runs[0]
    assert run.kwargs["project"] == "proj" and run.kwargs["name"] == "run1"
    assert run.kwargs["config"] == {"lr": 0.1} and run.kwargs["entity"] == "team"
    assert run.kwargs["resume"] == "allow" and run.kwargs["dir"] == str(tmp_path / "run1")
    assert run.logged == [(3, {"loss": 0.5}), (4, {"loss": 0.25})] and run.finished
    again = make_logger(tmp_path / "run1", tensorboard=False, wandb_project="proj")
    again.close()
    assert fake_wandb.runs[1].kwargs["id"] == run.kwargs["id"]  # a resumed run continues it


async def test_config_asks_for_wandb_and_the_trainer_logs_each_step(tmp_path, fake_wandb):
    cfg = parse_config({
        "env": "Signaling-v0", "env_kwargs": {"num_items": 2, "pool_size": 2},
        "policies": {"s": {"lr": 1e-3, "sampling": {"temperature": 1.0, "max_tokens": 1}}},
        "policy_map": {"speaker": "s", "listener": "s"},
        "trainer": {"batch_size": 2, "group_size": 2, "steps": 2},
        "logging": {"progress": False, "tensorboard": False, "wandb_project": "signal",
                    "wandb_name": "two-llms"},
        "run_dir": str(tmp_path)})
    trainer = cfg.build()
    try:
        await trainer.afit(cfg.trainer.steps)
    finally:
        await trainer.aclose()
    run = fake_wandb.runs[0]
    assert (run.kwargs["project"], run.kwargs["name"]) == ("signal", "two-llms")
    assert run.kwargs["config"]["env"] == "Signaling-v0"
    assert run.kwargs["config"]["logging"]["wandb_project"] == "signal"
    assert [step for step, _ in run.logged] == [1, 2] and run.finished
    assert run.logged[1][1]["policy/s/version"] == 2.0
    assert "policy/s/loss" in run.logged[0][1] and "train/speaker/success" in run.logged[0][1]


def test_wandb_asked_for_but_missing_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError, match=r"pip install wandb"):
        make_logger(tmp_path, tensorboard=False, wandb_project="proj")
    cfg = parse_config({"env": "Signaling-v0", "policies": {"s": {}},
                        "policy_map": {"speaker": "s", "listener": "s"},
                        "logging": {"wandb_project": "proj"}, "run_dir": str(tmp_path)})
    with pytest.raises(ImportError, match=r"logging\.wandb_project.*pip install wandb"):
        cfg.build()
