"""TicTacToe: self-play (one shared policy) vs separate parameters vs a scripted opponent pool.

Three ways to train tiny LLMs on ``TicTacToe-v0`` with GRPO, each after the same short SFT
warm start on games of the scripted ``tictactoe_heuristic`` (``--warm-player random`` for a
format-only one), then a greedy win/draw/loss table against scripted players (``heuristic``:
win/block/centre/corner; ``random``) on held-out seeds, in both seats:

* ``selfplay``: one policy ``shared`` plays X and O (``policy_map={"x": "shared", "o": "shared"}``;
  one parameter set, one train engine, samples of both seats in one batch).
* ``separate``: policies ``px`` and ``po``, one per seat, trained against each other (two
  parameter sets, two train engines).
* ``pool``: one policy ``vs_pool`` trained in both seats against a pool of scripted opponents
  (random and heuristic), drawn per episode by ``arena.VsScripted`` (an env wrapper: the
  Trainer's ``agents=`` fixes one scripted agent per seat for a whole run, not a pool).

Every game starts from up to two random opening moves (``opening_moves=2``) so that greedy
and scripted players meet varied positions across seeds; illegal moves are re-asked twice.
Results (table rows, train engines, timings) go to ``RUN_DIR/wdl.json``.

Usage::

    OMP_NUM_THREADS=1 python examples/tictactoe/compare.py [--steps 30] [--variants selfplay,pool]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arena import SEATS, VsScripted, evaluate_vs

from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

VARIANTS = ("selfplay", "separate", "pool")
OPENING_MOVES = 2
GAME = {"illegal": "reask", "max_reasks": 2}
"""TicTacToe rules in training and evaluation: an illegal move is re-asked twice, the third in a
row loses (so a policy's seat-mate almost always gets to act, and games teach more than legality)."""
POOL = ("random", "heuristic")


def make_policy(seed: int, model: str, sft_steps: int, lr: float) -> Policy:
    """A tiny LLM acting with one raw-text token (the cell digit) per move."""
    return Policy(model=model, seed=seed, lr=lr, api="completions", sft_steps=sft_steps,
                  sft_lr=3e-3, sampling={"temperature": 1.0, "max_tokens": 1})


def build(variant: str, *, model: str = "tiny:xs", sft_steps: int = 80, lr: float = 3e-4,
          batch_size: int = 16, group_size: int = 4, warm_episodes: int = 128,
          warm_player: str = "tictactoe_heuristic", run_dir: str | Path | None = None,
          seed: int = 0) -> Trainer:
    """The ``Trainer`` of one variant (not set up yet). ``warm_player`` plays every seat of the
    warm-start demonstrations (a name in ``areal_agents.agents.players`` or ``"random"``).

    Raises:
        ValueError: unknown variant.
    """
    common: dict[str, Any] = dict(algorithm="grpo", batch_size=batch_size, group_size=group_size,
                                  max_staleness=0, torch_threads=1, progress=False, seed=seed,
                                  run_dir=None if run_dir is None else Path(run_dir) / variant)

    def pol(s: int) -> Policy:
        return make_policy(s, model, sft_steps, lr)

    warm = {"episodes": warm_episodes}
    both = {"x": warm_player, "o": warm_player}
    game = {"opening_moves": OPENING_MOVES, **GAME}
    if variant == "selfplay":
        return Trainer(env="TicTacToe-v0", env_kwargs=game,
                       policies={"shared": pol(0)}, policy_map={"x": "shared", "o": "shared"},
                       warm_start={**warm, "players": both}, **common)
    if variant == "separate":
        return Trainer(env="TicTacToe-v0", env_kwargs=game,
                       policies={"px": pol(0), "po": pol(1)}, policy_map={"x": "px", "o": "po"},
                       warm_start={**warm, "players": both}, **common)
    if variant == "pool":
        return Trainer(env=lambda: VsScripted(POOL, SEATS, OPENING_MOVES),
                       policies={"vs_pool": pol(0)}, policy_map={"player": "vs_pool"},
                       warm_start={**warm, "players": {"player": warm_player}}, **common)
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


async def table_rows(trainer: Trainer, variant: str, when: str, opponents: list[str],
                     seeds: list[int]) -> list[dict[str, Any]]:
    """Greedy W/D/L of every policy of ``trainer`` in both seats against each opponent."""
    trained_seats = {p: {s for a, q in trainer.policy_of.items() if q == p
                         for s in ((a,) if a in SEATS else SEATS)} for p in trainer.policies}
    rows = []
    for policy in sorted(trainer.policies):
        for seat in SEATS:
            for opponent in opponents:
                rates = await evaluate_vs(trainer, policy, opponent, seat, seeds, OPENING_MOVES)
                rows.append({"variant": variant, "when": when, "policy": policy, "seat": seat,
                             "trained_seat": seat in trained_seats[policy],
                             "opponent": opponent, **rates})
    return rows


async def run_variant(variant: str, steps: int, *, opponents: list[str], seeds: list[int],
                      before: bool = True, **build_kw: Any) -> dict[str, Any]:
    """Warm start, (evaluate,) train ``steps`` GRPO steps, evaluate; rows and timings.

    Returns:
        ``{"variant", "rows": [...], "train_engines": [policy names], "policies_of_agents",
        "history", "seconds": {...}}``.
    """
    t0 = time.perf_counter()
    trainer = build(variant, **build_kw)
    rows: list[dict[str, Any]] = []
    try:
        await trainer.setup()
        engines = sorted(trainer.train_engines)
        params = {p: sum(x.numel() for x in e.model.parameters())
                  for p, e in trainer.train_engines.items() if hasattr(e, "model")}
        t1 = time.perf_counter()
        if before:
            rows += await table_rows(trainer, variant, "sft", opponents, seeds)
        t2 = time.perf_counter()
        history = await trainer.afit(steps)
        t3 = time.perf_counter()
        rows += await table_rows(trainer, variant, f"rl{steps}", opponents, seeds)
        t4 = time.perf_counter()
    finally:
        await trainer.aclose()
    return {"variant": variant, "rows": rows, "train_engines": engines, "parameters": params,
            "policy_of": dict(trainer.policy_of), "history": history,
            "seconds": {"setup_warm_start": t1 - t0, "eval_sft": t2 - t1, "train": t3 - t2,
                        "eval_final": t4 - t3, "total": t4 - t0}}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width W/D/L table (rates in %)."""
    head = (f"{'variant':9} {'when':6} {'policy':8} {'seat':4} {'vs':9} "
            f"{'win':>5} {'draw':>5} {'loss':>5} {'illegal':>7}  games")
    lines = [head, "-" * len(head)]
    for r in rows:
        seat = r["seat"].upper() + ("" if r["trained_seat"] else "*")
        lines.append(f"{r['variant']:9} {r['when']:6} {r['policy']:8} {seat:4} {r['opponent']:9} "
                     f"{100 * r['win']:5.0f} {100 * r['draw']:5.0f} {100 * r['loss']:5.0f} "
                     f"{100 * r['illegal']:7.0f}  {int(r['games'])}")
    lines.append("(* = a seat this policy was not trained in; illegal = losses by an illegal move)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps per variant")
    parser.add_argument("--model", default="tiny:xs")
    parser.add_argument("--sft-steps", type=int, default=80)
    parser.add_argument("--warm-player", default="tictactoe_heuristic",
                        help="demonstration player of the warm start (or 'random')")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-games", type=int, default=24, help="per policy, seat, opponent")
    parser.add_argument("--opponents", default="heuristic,random")
    parser.add_argument("--no-before", action="store_true", help="skip the post-SFT evaluation")
    parser.add_argument("--run-dir", default="runs/tictactoe_compare")
    args = parser.parse_args(argv)
    seeds = list(range(3_000_000, 3_000_000 + args.eval_games))
    results = []
    for variant in args.variants.split(","):
        result = asyncio.run(run_variant(
            variant, args.steps, opponents=args.opponents.split(","), seeds=seeds,
            before=not args.no_before, model=args.model, sft_steps=args.sft_steps,
            lr=args.lr, warm_player=args.warm_player, run_dir=args.run_dir))
        sec = result["seconds"]
        print(f"{variant}: train engines {result['train_engines']}; "
              + ", ".join(f"{k} {v:.0f}s" for k, v in sec.items()), flush=True)
        results.append(result)
    print(format_table([r for res in results for r in res["rows"]]))
    out = Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = [{k: v for k, v in r.items() if k != "history"} for r in results]
    (out / "wdl.json").write_text(json.dumps(summary, indent=1))
    print(f"table: {out / 'wdl.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
