"""TicTacToe against an opponent pool: the recipe that learned to draw the heuristic (run D).

One policy ``p`` (``tiny:xs``, one raw-text token per move) plays both seats
(``policy_map={"x": "p", "o": "p"}``); every training episode puts one pool member in the
opponent's seat (``OpponentPool(seat="any")``, drawn per task seed). The defaults are run D
of the README: prompts list the free cells (``TicTacToe(list_free=True)``), the pool is the
scripted ``heuristic`` only (``--members``; add ``random`` or ``--snapshot-every k`` for
snapshots of ``p``, drawn by PFSP), 64 games a step in groups of 8, lr 3e-4, 80 SFT steps
on the heuristic's games, 70 steps. Then:

* before RL (after the SFT warm start) and every ``--eval-every`` steps, greedy games against
  the heuristic in both seats on held-out seeds: win+draw rate with a 95% Wilson interval
  (``RUN_DIR/curve.json``, rewritten after each point, so a stopped run keeps its figures);
* at the same points a league (``p``, the pool's scripted players, ``random`` and
  ``minimax``, every one against every other in both seats): ``RUN_DIR/league/step_<n>.json``,
  ``final.json`` and the heatmap + Elo plot ``RUN_DIR/league.png`` (``areal-agents plot``).

Rewards: TicTacToe's (+1 win, 0 draw, -1 loss) plus ``--draw-bonus`` for a draw and minus
``--illegal-penalty`` for a game lost by illegal moves (without it an illegal move costs
no more than a lost game, and RL drifted into illegal moves).

Usage::

    OMP_NUM_THREADS=1 python examples/tictactoe/train_pool.py --seed 1
    areal-agents train examples/tictactoe/pool.yaml     # the same run from YAML (no report)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

from areal_agents.episode import Episode
from areal_agents.league import OpponentPool
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

SEATS = ("x", "o")


def shaped_reward(draw_bonus: float, illegal_penalty: float):
    """``reward_fn(episode)``: ``+draw_bonus`` to both seats of a draw, ``-illegal_penalty`` to
    the seat that lost by illegal moves (the env's info names the ``loser``)."""

    def fn(episode: Episode) -> dict[str, float]:
        out = dict.fromkeys(episode.returns, 0.0)
        info = next(iter(episode.infos.values()), {})
        if "illegal" in info and info.get("loser") in out:
            out[info["loser"]] -= illegal_penalty
        elif info.get("winner", "?") is None:  # a full board without a line
            out = {a: draw_bonus for a in out}
        return out

    return fn


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate ``successes / n``.

    Example:
        >>> [round(v, 3) for v in wilson(50, 100)]
        [0.404, 0.596]
    """
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def build(args: argparse.Namespace) -> Trainer:
    """The run's ``Trainer`` (not set up)."""
    policy = Policy(model=args.model, seed=args.seed, lr=args.lr, api="completions",
                    sft_steps=args.sft_steps, sft_lr=3e-3,
                    sampling={"temperature": 1.0, "max_tokens": 1})
    pool = OpponentPool(members=args.members.split(","), seat="any",
                        snapshot_every=args.snapshot_every, max_snapshots=args.max_snapshots,
                        sampling="pfsp", league_every=args.league_every,
                        league_seeds=range(4_000_000, 4_000_000 + args.league_games))
    env_kwargs = {"opening_moves": 2, "illegal": args.illegal, "list_free": args.list_free}
    return Trainer(env="TicTacToe-v0", env_kwargs=env_kwargs,
                   policies={"p": policy}, policy_map={"x": "p", "o": "p"}, opponents=pool,
                   algorithm="grpo", batch_size=args.batch_size, group_size=args.group_size,
                   warm_start={"episodes": args.warm_episodes, "players": {"x": "tictactoe_heuristic",
                                                            "o": "tictactoe_heuristic"}},
                   reward_fns=[shaped_reward(args.draw_bonus, args.illegal_penalty)],
                   eval_every=args.league_every, eval_seeds=range(1_000_000, 1_000_008),
                   run_dir=args.run_dir, resume=args.resume, progress=False, seed=args.seed)


async def vs_heuristic(trainer: Trainer, games: int) -> dict[str, Any]:
    """Greedy games against the heuristic, ``games`` per seat: win/draw/loss counts per seat
    and the win+draw rate over both seats with its 95% Wilson interval."""
    seeds = list(range(3_000_000, 3_000_000 + games))
    rates = await trainer.evaluate(seeds, opponents=["heuristic"], seats=list(SEATS))
    out: dict[str, Any] = {}
    for learner in SEATS:
        out[learner] = {o: round(rates[f"eval/{learner}/vs/heuristic/{o}"] * games)
                        for o in ("win", "draw", "loss")}
    ok = sum(out[s]["win"] + out[s]["draw"] for s in SEATS)
    out["win_draw"] = ok / (2 * games)
    out["wilson95"] = wilson(ok, 2 * games)
    return out


def eval_points(start: int, steps: int, every: int) -> list[int]:
    """The global steps after ``start`` at which a run to ``steps`` stops to evaluate.

    Example:
        >>> eval_points(0, 25, 10), eval_points(30, 70, 0)
        ([10, 20, 25], [70])
    """
    grid = list(range(start - start % every + every, steps, every)) if every > 0 else []
    return [*grid, steps] if steps > start else []


async def checkpoint_eval(trainer: Trainer, args: argparse.Namespace) -> dict[str, Any]:
    """At ``trainer.step``: greedy games vs the heuristic (``vs_heuristic``) and a league of
    ``p``, the pool's players, ``random`` and ``minimax`` (``RUN_DIR/league/step_<n>.json``)."""
    point = {"step": trainer.step, **await vs_heuristic(trainer, args.eval_games)}
    players = trainer.league.league_players(trainer)
    players += [m for m in ("random", "minimax") if m not in players]
    league = {**await trainer.league.play_league(trainer, players), "step": trainer.step}
    path = Path(args.run_dir) / "league" / f"step_{trainer.step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(league, indent=1))
    point["elo"] = league["elo"]
    print(f"step {trainer.step}:", json.dumps({k: v for k, v in point.items() if k != "elo"}),
          "elo", {k: round(v) for k, v in league["elo"].items()}, flush=True)
    return {"point": point, "league": league}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    trainer = build(args)
    run_dir = Path(args.run_dir)
    curve_path = run_dir / "curve.json"
    try:
        await trainer.setup()
        t1 = time.perf_counter()
        if args.resume and curve_path.exists():  # the points of the run being continued
            curve = [p for p in json.loads(curve_path.read_text()) if p["step"] <= trainer.step]
            league = json.loads((run_dir / "league" / "final.json").read_text())
        else:
            first = await checkpoint_eval(trainer, args)
            curve, league = [first["point"]], first["league"]
        curve_path.write_text(json.dumps(curve, indent=1))
        t2 = time.perf_counter()
        for step in eval_points(trainer.step, args.steps, args.eval_every):
            await trainer.afit(step)
            done = await checkpoint_eval(trainer, args)
            curve.append(done["point"])
            league = done["league"]
            curve_path.write_text(json.dumps(curve, indent=1))
        t3 = time.perf_counter()
    finally:
        await trainer.aclose()
    result = {"start": curve[0], "final": curve[-1], "steps": curve[-1]["step"],
              "elo": league["elo"], "curve": [{k: v for k, v in p.items() if k != "elo"}
                                              for p in curve],
              "seconds": {"setup_sft": t1 - t0, "eval_start": t2 - t1,
                          "train_and_evals": t3 - t2, "total": t3 - t0}}
    write_results(run_dir, league, result)
    return result


def write_results(run_dir: Path, league: dict[str, Any], result: dict[str, Any]) -> None:
    """``RUN_DIR/league/final.json`` (the last league) and ``RUN_DIR/result.json``."""
    (run_dir / "league").mkdir(parents=True, exist_ok=True)
    (run_dir / "league" / "final.json").write_text(json.dumps(league, indent=1))
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (defaults: run D of the README)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--seed", type=int, default=0,
                        help="run seed: model init, warm-start games, task seeds, draws")
    parser.add_argument("--model", default="tiny:xs")
    parser.add_argument("--sft-steps", type=int, default=80)
    parser.add_argument("--warm-episodes", type=int, default=128,
                        help="heuristic-vs-heuristic games of the SFT warm start")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--members", default="heuristic",
                        help="scripted pool members, comma-separated")
    parser.add_argument("--list-free", action=argparse.BooleanOptionalAction, default=True,
                        help="list the empty cells in every prompt (TicTacToe(list_free=True))")
    parser.add_argument("--illegal", choices=["reask", "penalty"], default="reask",
                        help="TicTacToe's illegal-move rule (penalty: the first one loses)")
    parser.add_argument("--snapshot-every", type=int, default=0, help="0: no snapshots")
    parser.add_argument("--max-snapshots", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=10,
                        help="steps between evaluations vs the heuristic + league (0: end only)")
    parser.add_argument("--league-every", type=int, default=0,
                        help="the trainer's own league (pool players only) every k steps")
    parser.add_argument("--league-games", type=int, default=8, help="seeds per ordered pair")
    parser.add_argument("--eval-games", type=int, default=100, help="per seat vs heuristic")
    parser.add_argument("--draw-bonus", type=float, default=0.5)
    parser.add_argument("--illegal-penalty", type=float, default=1.0)
    parser.add_argument("--run-dir", default="runs/tictactoe_pool")
    parser.add_argument("--resume", action="store_true",
                        help="continue RUN_DIR's run up to --steps (its start figures are kept)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps({k: v for k, v in result.items() if k != "elo"}, indent=1))
    print("elo:", {k: round(v) for k, v in result["elo"].items()})
    try:
        from areal_agents.plot import plot_run

        print("plot:", plot_run(args.run_dir))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"plot skipped: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
