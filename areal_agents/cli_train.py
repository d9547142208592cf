"""``areal-agents train | eval | plot``: run a config, evaluate a run, plot its metrics."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train the policies of a YAML run config")
    p.add_argument("config", help="YAML run config (see areal_agents.config.RunConfig)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--resume", action="store_true", help="continue from run_dir's last checkpoint")
    p.set_defaults(func=train)


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="greedy evaluation of a config or a run directory")
    p.add_argument("target", help="YAML config or RUN_DIR (uses RUN_DIR/config.yaml + checkpoint)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=evaluate)


def add_plot_parser(sub: Any) -> None:
    p = sub.add_parser("plot", help="PNG of reward/success per agent over steps and time")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output PNG (default RUN_DIR/plot.png)")
    p.set_defaults(func=plot)


def train(args: argparse.Namespace) -> int:
    from .config import load_config

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
    png = plot_run(run_dir)
    print(f"metrics: {run_dir / 'metrics.jsonl'}  plot: {png}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from .config import load_config

    target = Path(args.target)
    resume = target.is_dir()
    config_path = target / "config.yaml" if resume else target
    overrides = list(args.overrides) + ([f"run_dir={target}"] if resume else [])
    cfg = load_config(config_path, overrides)
    cfg.logging.progress = False
    if resume:
        cfg.trainer.warm_start = None  # the checkpoint already holds trained weights
    trainer = cfg.build(resume=resume)

    async def run() -> dict[str, float]:
        try:
            return await trainer.evaluate(cfg.trainer.eval_seeds)
        finally:
            await trainer.aclose()

    print(json.dumps({k: round(v, 4) for k, v in asyncio.run(run()).items()}, indent=1))
    return 0


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Rows of ``run_dir/metrics.jsonl`` (empty list when missing)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot ``train|eval/<agent>/{reward,success}`` over steps and wall time (train curves as a
    20-step rolling mean); returns the PNG.

    Raises:
        FileNotFoundError: no metrics in ``run_dir``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"no metrics.jsonl rows in {run_dir}; train first")
    keys = sorted({k for r in rows for k in r
                   if k.startswith(("train/", "eval/")) and k.endswith(("/reward", "/success"))})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in keys:
        pts = [(r["step"], r.get("time", 0.0), r[key]) for r in rows if key in r]
        steps, times, values = zip(*pts, strict=True)
        if key.startswith("train/"):  # per-step batches are noisy: rolling mean of 20 steps
            values = tuple(sum(values[max(0, i - 19): i + 1]) / len(values[max(0, i - 19): i + 1])
                           for i in range(len(values)))
        style = "--" if key.startswith("eval/") else "-"
        axes[0].plot(steps, values, style, label=key)
        axes[1].plot(times, values, style, label=key)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall time (s)")
    for ax in axes:
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{Path(run_dir).name}: reward / success per agent")
    fig.tight_layout()
    png = Path(out) if out else Path(run_dir) / "plot.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot(args: argparse.Namespace) -> int:
    try:
        png = plot_run(args.run_dir, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(png)
    return 0


__all__ = ["add_eval_parser", "add_plot_parser", "add_train_parser", "plot_run"]
