"""PrisonersDilemma with separate parameters per seat, each against a pool of its own snapshots.

Two policies, ``p0`` (seat ``player_0``) and ``p1`` (seat ``player_1``), each a ``tiny:xs``
model replying with one raw-text token (``C`` or ``D``) per round. Every training episode puts
one pool member in one seat (``OpponentPool(seat="any")``, drawn per task seed): a snapshot of
the policy that normally plays that seat (taken every ``--snapshot-every`` of its steps, the
latest drawn most: ``sampling="latest"``) or one of the scripted ``tit_for_tat``,
``always_defect`` and ``always_cooperate`` players; the other seat's policy trains. At the end
a league (every policy, snapshot and scripted player against every other, both seats, greedy,
held-out seeds) gives the win/draw/loss matrix (a "win" is more points than the other player
in the episode) and Elo ratings: ``RUN_DIR/league/final.json`` and ``RUN_DIR/league.png``.

Usage::

    OMP_NUM_THREADS=1 python examples/prisoners_dilemma/train_league.py --steps 40

Each episode trains only the policy whose seat the pool does not take, so the two policies
fill their batches at about half the episode rate; ``clock="independent"`` lets each train
when its own batch is ready (under ``"lockstep"`` the run stalled at step 5 in our test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from areal_agents.league import OpponentPool
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

SCRIPTED = ["tit_for_tat", "always_defect", "always_cooperate"]


def build(args: argparse.Namespace) -> Trainer:
    """The run's ``Trainer`` (not set up)."""

    def policy(seed: int) -> Policy:
        return Policy(model="tiny:xs", seed=seed, lr=args.lr, api="completions",
                      sft_steps=args.sft_steps, sft_lr=3e-3,
                      sampling={"temperature": 1.0, "max_tokens": 1})

    pool = OpponentPool(members=SCRIPTED, seat="any", snapshot_every=args.snapshot_every,
                        max_snapshots=3, sampling="latest",
                        league_seeds=range(5_000_000, 5_000_000 + args.league_games))
    return Trainer(env="PrisonersDilemma-v0", env_kwargs={"rounds": args.rounds},
                   policies={"p0": policy(0), "p1": policy(1)},
                   policy_map={"player_0": "p0", "player_1": "p1"}, opponents=pool,
                   algorithm="grpo", batch_size=args.batch_size, group_size=args.group_size,
                   warm_start={"episodes": 64, "players": {"player_0": "random",
                                                           "player_1": "random"}},
                   clock=args.clock, run_dir=args.run_dir, progress=False, seed=0)


def format_table(league: dict[str, Any]) -> str:
    """A markdown table: each player's W/D/L against each other (both seats) and its Elo."""
    players = league["players"]
    head = "| player | Elo | " + " | ".join(players) + " |"
    lines = [head, "|" + "---|" * (len(players) + 2)]
    for a in sorted(players, key=lambda p: -league["elo"][p]):
        cells = []
        for b in players:
            c = league["matrix"][a].get(b)
            cells.append("" if c is None else f"{c['win']:.0f}/{c['draw']:.0f}/{c['loss']:.0f}")
        lines.append(f"| {a} | {league['elo'][a]:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    trainer = build(args)
    try:
        await trainer.setup()
        t1 = time.perf_counter()
        history = await trainer.afit(args.steps)
        t2 = time.perf_counter()
        league = await trainer.league.play_league(trainer)
        t3 = time.perf_counter()
    finally:
        await trainer.aclose()
    out = Path(args.run_dir)
    (out / "league").mkdir(parents=True, exist_ok=True)
    (out / "league" / "final.json").write_text(json.dumps(league, indent=1))
    last = history[-1] if history else {}
    return {"league": league, "train_reward": {k: v for k, v in last.items()
                                               if k.startswith("train/") and "reward" in k},
            "seconds": {"setup_sft": t1 - t0, "train": t2 - t1, "league": t3 - t2,
                        "total": t3 - t0}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40,
                        help="policy steps in all (clock='independent': each is a global step)")
    parser.add_argument("--clock", default="independent",
                        help="'independent': each policy trains when its own batch is ready (an "
                        "episode trains only the seat the pool does not take)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--snapshot-every", type=int, default=5)
    parser.add_argument("--league-games", type=int, default=8, help="seeds per ordered pair")
    parser.add_argument("--run-dir", default="runs/pd_league")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(format_table(result["league"]))
    print(json.dumps({k: v for k, v in result.items() if k != "league"}, indent=1))
    try:
        from areal_agents.league.plot import plot_league

        print("plot:", plot_league(args.run_dir))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"plot skipped: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
