"""TicTacToe vs the scripted heuristic: turn-level (``group_by="turn"``) vs role-level credit.

Both arms are the same run (``train_pool.py``'s run D recipe, shortened) except for
``group_by``: the same seed, warm start, task seeds and number of games. Every prompt holds
the newest observation only (``Policy(context="last")``; ``list_free=True`` restates the whole
state each turn), so each move is its own sample: with ``"role"`` a move's reward is normalised
against every move of the same seat on the same task, with ``"turn"`` against the same seat's
k-th moves only. Greedy win+draw vs the heuristic (both seats, held-out seeds) before and
after RL goes to ``RUN_DIR/<arm>.json``.

    OMP_NUM_THREADS=1 python examples/tictactoe/turn_groups.py --group-by turn
    OMP_NUM_THREADS=1 python examples/tictactoe/turn_groups.py --group-by role
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from train_pool import shaped_reward, vs_heuristic

from areal_agents.league import OpponentPool
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer


def build(args: argparse.Namespace) -> Trainer:
    """The arm's ``Trainer`` (not set up)."""
    policy = Policy(model="tiny:xs", seed=args.seed, lr=args.lr, api="completions",
                    context="last", sft_steps=args.sft_steps, sft_lr=3e-3,
                    sampling={"temperature": 1.0, "max_tokens": 1},
                    algorithm_params={"group_by": args.group_by})
    pool = OpponentPool(members=["heuristic"], seat="any", snapshot_every=0, sampling="pfsp")
    return Trainer(env="TicTacToe-v0",
                   env_kwargs={"opening_moves": 2, "illegal": "reask", "list_free": True},
                   policies={"p": policy}, policy_map={"x": "p", "o": "p"}, opponents=pool,
                   algorithm="grpo", batch_size=args.batch_size, group_size=args.group_size,
                   warm_start={"episodes": args.warm_episodes,
                               "players": {"x": "tictactoe_heuristic",
                                           "o": "tictactoe_heuristic"}},
                   reward_fns=[shaped_reward(0.5, 1.0)], progress=False, seed=args.seed,
                   run_dir=str(Path(args.run_dir) / args.group_by))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    trainer = build(args)
    try:
        await trainer.setup()
        start = await vs_heuristic(trainer, args.eval_games)
        history = await trainer.afit(args.steps)
        end = await vs_heuristic(trainer, args.eval_games)
    finally:
        await trainer.aclose()
    return {"group_by": args.group_by, "steps": args.steps, "seed": args.seed,
            "games_per_step": args.batch_size, "start": start, "end": end,
            "train_reward_first5": _mean(history[:5]), "train_reward_last5": _mean(history[-5:]),
            "wall_s": round(time.perf_counter() - t0), "load_avg_end": os.getloadavg()}


def _mean(rows: list[dict[str, float]]) -> float:
    values = [r[k] for r in rows for k in r if k.startswith("train/") and k.endswith("/reward")]
    return sum(values) / max(1, len(values))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-by", choices=["role", "turn"], required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=80)
    parser.add_argument("--warm-episodes", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--eval-games", type=int, default=50, help="per seat vs heuristic")
    parser.add_argument("--run-dir", default="runs/tictactoe_turn_groups")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    out = Path(args.run_dir) / f"{args.group_by}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
