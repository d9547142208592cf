"""Metric loggers and the plot/train CLI plumbing (no model)."""

from __future__ import annotations

import json

import pytest

from areal_agents.cli import build_parser
from areal_agents.cli_train import plot_run, read_metrics
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
