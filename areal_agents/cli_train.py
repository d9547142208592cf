"""``areal-agents train | eval | plot``: run a config, evaluate a run, plot its metrics."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from .plot import plot_run, read_metrics


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train the policies of a YAML run config")
    p.add_argument("config", help="YAML run config (see areal_agents.config.RunConfig)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--resume", action="store_true", help="continue from run_dir's last checkpoint")
    # SUPPRESS: absent, it never overrides `areal-agents --debug train ...`
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of a configuration error")
    p.set_defaults(func=train)


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="greedy evaluation of a config or a run directory")
    p.add_argument("target", help="YAML config or RUN_DIR (uses RUN_DIR/config.yaml + checkpoint)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--opponent", action="append", default=None, metavar="NAME",
                   help="play against NAME instead (a scripted player such as heuristic or "
                   "random, a frozen policy, or 'pool': every member of the config's opponent "
                   "pool); repeatable")
    p.add_argument("--seat", action="append", default=None, metavar="AGENT",
                   help="the opponent's seat (agent id) with --opponent; repeatable "
                   "(default: every seat)")
    p.set_defaults(func=evaluate)


def add_plot_parser(sub: Any) -> None:
    p = sub.add_parser("plot", help="PNG of reward/success per agent over steps and time")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output PNG (default RUN_DIR/plot.png)")
    p.set_defaults(func=plot)


def train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import ConfigError

    if not Path(args.config).is_file():
        raise ConfigError(f"config file {args.config} not found (train takes a YAML run config, "
                          "e.g. examples/signaling/two_llms.yaml)")
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(exclude={"resume"}), sort_keys=False))
    trainer = cfg.build(resume=args.resume)

    async def run() -> list[dict[str, float]]:
        try:
            return await trainer.afit(cfg.trainer.steps)
        finally:
            await trainer.aclose()

    history = asyncio.run(run())
    last = history[-1] if history else {}
    summary = {k: round(v, 4) for k, v in last.items() if "success" in k or "reward" in k}
    print(json.dumps({"steps": len(history), **summary}, indent=1))
    try:
        plotted = str(plot_run(run_dir))
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as exc:
        plotted = f"skipped ({exc})"  # the run itself succeeded: exit 0
    print(f"metrics: {run_dir / 'metrics.jsonl'}  plot: {plotted}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from .config import load_config

    target = Path(args.target)
    resume = target.is_dir()
    if resume and (problem := untrained_run_dir(target)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    config_path = target / "config.yaml" if resume else target
    overrides = list(args.overrides) + ([f"run_dir={target}"] if resume else [])
    cfg = load_config(config_path, overrides)
    cfg.logging.progress = False
    if resume:
        cfg.trainer.warm_start = None  # the checkpoint already holds trained weights
    trainer = cfg.build(resume=resume)

    opponents = args.opponent
    if opponents and "pool" in opponents:  # the config's pool members (snapshots: by name)
        members = cfg.opponents.members if cfg.opponents is not None else []
        opponents = [o for o in opponents if o != "pool"] + members
    if args.seat and not opponents:
        print("error: --seat is the opponent's seat; give --opponent NAME too", file=sys.stderr)
        return 2

    async def run() -> dict[str, float]:
        try:
            return await trainer.evaluate(cfg.trainer.eval_seeds, opponents=opponents,
                                          seats=args.seat)
        finally:
            await trainer.aclose()

    print(json.dumps({k: round(v, 4) for k, v in asyncio.run(run()).items()}, indent=1))
    return 0


def untrained_run_dir(run_dir: Path) -> str | None:
    """Why ``eval RUN_DIR`` would not evaluate trained weights (``None`` when it would): no
    ``config.yaml``, or no complete checkpoint (a resume would silently start untrained)."""
    from areal_agents.errors import TrainError
    from areal_agents.trainers.checkpointing import latest_checkpoint

    if not (run_dir / "config.yaml").exists():
        return (f"{run_dir} is not a run directory (no config.yaml); pass the run_dir that "
                "`areal-agents train` wrote, or a YAML config")
    try:
        if latest_checkpoint(run_dir) is not None:
            return None
    except TrainError as exc:
        return str(exc)
    return (f"{run_dir} has no saved weights ({run_dir / 'checkpoints' / 'latest'} is missing), "
            "so eval would score the untrained starting model; finish training it with "
            f"`areal-agents train {run_dir / 'config.yaml'} --resume` (a run saves its final "
            "weights), or evaluate the starting model on purpose with "
            f"`areal-agents eval {run_dir / 'config.yaml'}`")


def plot(args: argparse.Namespace) -> int:
    try:
        png = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(png)
    return 0


__all__ = ["add_eval_parser", "add_plot_parser", "add_train_parser", "plot_run", "read_metrics"]
