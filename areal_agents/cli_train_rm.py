"""``areal-agents train-rm``: fit a Bradley-Terry reward model to JSONL preference pairs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_train_rm_parser(sub: Any) -> None:
    p = sub.add_parser("train-rm", help="train a Bradley-Terry reward model on preference pairs",
                       description="Rows are {\"prompt\", \"chosen\", \"rejected\"}, each a "
                       "string or a list of chat messages. Writes the model to --out (load it "
                       "with RewardModel.load) and the eval rows to OUT/metrics.jsonl.")
    p.add_argument("--pairs", required=True, help="training pairs (JSONL)")
    p.add_argument("--eval-pairs", help="held-out pairs (JSONL): accuracy and loss per eval")
    p.add_argument("--model", default="tiny:xs", help="'tiny:<size>[:seed=N]' or an HF "
                   "checkpoint directory (its backbone; the score head is new)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evals (0: "
                   "only before and after training)")
    p.add_argument("--max-length", type=int, default=512, help="tokens kept per sequence")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    p.set_defaults(func=train_rm)


def train_rm(args: argparse.Namespace) -> int:
    from areal_agents.metrics import JSONLLogger
    from areal_agents.rewards.reward_model import RewardModel, read_pairs, train_reward_model

    try:
        pairs = read_pairs(args.pairs)
        eval_pairs = read_pairs(args.eval_pairs) if args.eval_pairs else None
        rm = RewardModel.from_pretrained(args.model, seed=args.seed, max_length=args.max_length)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # this run's rows only
    logger = JSONLLogger(out / "metrics.jsonl")
    try:
        rm = train_reward_model(pairs, model=rm, steps=args.steps, lr=args.lr,
                                batch_size=args.batch_size, eval_pairs=eval_pairs,
                                eval_every=args.eval_every, seed=args.seed, logger=logger)
    finally:
        logger.close()
    rm.save(out)
    first, last = rm.history[0], rm.history[-1]
    summary = {"pairs": len(pairs), "eval_pairs": len(eval_pairs or []), "steps": args.steps,
               **{f"{k.removeprefix('rm/')}_start": round(v, 4) for k, v in first.items()
                  if k.startswith("rm/eval")},
               **{k.removeprefix("rm/"): round(v, 4) for k, v in last.items() if k != "step"}}
    print(json.dumps(summary, indent=1))
    print(f"reward model: {out}  metrics: {out / 'metrics.jsonl'}")
    return 0


__all__ = ["add_train_rm_parser", "train_rm"]
