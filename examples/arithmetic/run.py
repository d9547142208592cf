"""SFT warm start, then GRPO, on Arithmetic-v0: exact-match accuracy before and after RL.

Runs a YAML run config (``examples/arithmetic/sft_then_rl.yaml``) through ``aa.Trainer`` and
measures greedy exact-match accuracy on the held-out ``trainer.eval_seeds``:

* ``untrained``: the seed-initialised model without warm start (``--no-baseline`` skips it),
* ``sft``: right after the SFT warm start, before any RL step (step 0),
* ``rl``: after ``trainer.steps`` GRPO steps.

The step-0 and final accuracies are also logged to ``RUN_DIR/metrics.jsonl`` (``eval/...`` at
steps 0 and ``steps``) and the three figures are written to ``RUN_DIR/accuracy.json``.

Usage::

    OMP_NUM_THREADS=1 python examples/arithmetic/run.py examples/arithmetic/sft_then_rl.yaml \
        [key.sub=value ...] [--no-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from areal_agents.config import RunConfig, load_config


def accuracy_key(cfg: RunConfig) -> str:
    """The eval metric holding exact-match accuracy: ``eval/<agent>/success``."""
    (agent,) = cfg.policy_map
    return f"eval/{agent}/success"


async def untrained_accuracy(cfg: RunConfig) -> float:
    """Greedy accuracy of the seed-initialised model (no warm start, no RL) on the eval seeds."""
    bare = cfg.model_copy(deep=True)
    bare.trainer.warm_start = None
    bare.logging.progress, bare.logging.tensorboard = False, False
    bare.run_dir = str(Path(cfg.run_dir) / "untrained")
    trainer = bare.build()
    try:
        return (await trainer.evaluate(bare.trainer.eval_seeds))[accuracy_key(cfg)]
    finally:
        await trainer.aclose()


async def run(cfg: RunConfig, baseline: bool = True) -> dict[str, Any]:
    """Warm start, evaluate (step 0), train ``cfg.trainer.steps`` steps, evaluate again.

    Returns:
        ``{"untrained": acc | None, "sft": acc, "rl": acc, "steps": n, "history": [...],
        "seconds": {...}}`` with accuracies in [0, 1] on ``cfg.trainer.eval_seeds``.
    """
    key, steps = accuracy_key(cfg), cfg.trainer.steps
    t0 = time.perf_counter()
    untrained = await untrained_accuracy(cfg) if baseline else None
    t1 = time.perf_counter()
    trainer = cfg.build()
    try:
        await trainer.setup()  # builds the models and runs the SFT warm start
        t2 = time.perf_counter()
        sft_eval = await trainer.evaluate(cfg.trainer.eval_seeds)
        trainer.logger.log(0, sft_eval)
        t3 = time.perf_counter()
        history = await trainer.afit(steps)
        last = history[-1] if history else {}
        if key in last:  # the trainer evaluated at its last step already
            rl_eval = {k: v for k, v in last.items() if k.startswith("eval/")}
        else:
            rl_eval = await trainer.evaluate(cfg.trainer.eval_seeds)
            trainer.logger.log(trainer.step, rl_eval)
        t4 = time.perf_counter()
    finally:
        await trainer.aclose()
    result = {
        "untrained": untrained, "sft": sft_eval[key], "rl": rl_eval[key], "steps": len(history),
        "eval_seeds": len(cfg.trainer.eval_seeds), "history": history,
        "seconds": {"untrained_eval": t1 - t0, "setup_and_warm_start": t2 - t1,
                    "sft_eval": t3 - t2, "rl_and_final_eval": t4 - t3, "total": t4 - t0},
    }
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "history"}
    (run_dir / "accuracy.json").write_text(json.dumps(summary, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip evaluating the untrained model")
    args = parser.parse_intermixed_args(argv)  # options may come between the overrides
    cfg = load_config(args.config, args.overrides)
    result = asyncio.run(run(cfg, baseline=not args.no_baseline))
    n, sec = result["eval_seeds"], result["seconds"]
    print(f"greedy exact-match accuracy on {n} held-out seeds:")
    if result["untrained"] is not None:
        print(f"  untrained            {result['untrained']:.3f}")
    print(f"  after SFT (step 0)   {result['sft']:.3f}")
    print(f"  after RL (step {result['steps']:>3})  {result['rl']:.3f}")
    print(f"  RL - SFT             {result['rl'] - result['sft']:+.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sec.items()))
    print(f"metrics: {Path(cfg.run_dir) / 'metrics.jsonl'}  "
          f"summary: {Path(cfg.run_dir) / 'accuracy.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
