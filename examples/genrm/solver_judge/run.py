"""A trainable judge: SolverJudge-v0 with two separately parameterised LLMs, both trained.

The solver answers one-digit ``a + b`` / ``a - b``; the judge reads the task and the
solver's reply and says ``correct`` or ``incorrect``. The judge is rewarded for agreeing with
the exact verifier; the solver by the judge's verdict (``--truth-weight w`` mixes in ground
truth: ``(1 - w) * verdict + w * truth``). Both start from a short SFT warm start: the solver
imitates the env's random valid replies (the right answer half the time), the judge the
exact scripted judge on them, so each is a weak starting point.

Logged every step (``RUN_DIR/metrics.jsonl``; ``areal-agents plot RUN_DIR``):
``train/judge/success`` = the judge's accuracy against ground truth, ``train/solver/success``
= the solver's true accuracy, ``train/solver/reward`` = how often the judge said correct, and
from ``JudgeTally`` ``judge_stats/{false_positive_rate,false_negative_rate,no_verdict}``.
Greedy held-out figures at step 0 (after the warm start) and at the end.

Usage::

    OMP_NUM_THREADS=1 python examples/genrm/solver_judge/run.py --run-dir runs/genrm_sj
    areal-agents plot runs/genrm_sj
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import areal_agents as aa
from areal_agents.episode import Episode

STOP = ["<|im_end|>"]


class JudgeTally:
    """A reward function that adds nothing and counts the judge's verdicts against ground
    truth (``info["solver_correct"]``); ``take_metrics()`` is logged by the Trainer each step.

    ``false_positive_rate``: wrong answers judged correct / wrong answers;
    ``false_negative_rate``: right answers judged incorrect / right answers;
    ``no_verdict``: replies without a verdict / episodes.
    """

    policy: str | None = None  # calls no served model (aa.rewards.hooks.ModelReward)

    def __init__(self) -> None:
        self.counts = dict.fromkeys(("tp", "fp", "tn", "fn", "none"), 0)

    def bind(self, client: Any) -> None:
        """No model to call."""

    def __call__(self, episode: Episode) -> float:
        info = episode.infos.get("judge", {})
        if "solver_correct" in info:
            truth, verdict = info["solver_correct"], info["verdict"]
            if verdict is None:
                self.counts["none"] += 1
            else:
                said = verdict == "correct"
                self.counts[("t" if said == truth else "f") + ("p" if said else "n")] += 1
        return 0.0

    def take_metrics(self) -> dict[str, float]:
        """The rates over the episodes since the last call; the counts restart."""
        c, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        wrong, right = c["fp"] + c["tn"], c["tp"] + c["fn"]
        total = sum(c.values())
        out = {"judge_stats/episodes": float(total)}
        if wrong:
            out["judge_stats/false_positive_rate"] = c["fp"] / wrong
        if right:
            out["judge_stats/false_negative_rate"] = c["fn"] / right
        if total:
            out["judge_stats/no_verdict"] = c["none"] / total
        return out


class BalancedJudgeReward:
    """Class-balanced judge reward: a reward function that rescales the env's agreement reward
    of the judge so that each class of solver answer (right / wrong) carries half the weight.

    It adds ``agreed * (0.5 / p_class - 1)`` to the judge's env reward (``agreed``: 1 when the
    verdict matches ground truth), so the judge's total is ``agreed * 0.5 / p_class``, where
    ``p_class`` is the running share of that class among the episodes seen so far (counts
    start at one each). The expected total is then the judge's *balanced* accuracy: always
    saying "incorrect" earns 0.5 however rare right answers are, only a judge that checks the
    answer earns 1. The solver's reward is left alone.

    Example:
        >>> fn = BalancedJudgeReward()
        >>> fn.weight(True), fn.weight(False)  # no data yet: p = 0.5 for both
        (1.0, 1.0)
    """

    policy: str | None = None  # calls no served model

    def __init__(self) -> None:
        self.counts = {True: 1, False: 1}  # solver right / wrong, Laplace-smoothed

    def bind(self, client: Any) -> None:
        """No model to call."""

    def weight(self, solver_correct: bool) -> float:
        """``0.5 / p_class`` for an episode whose solver answer is ``solver_correct``."""
        return 0.5 * sum(self.counts.values()) / self.counts[solver_correct]

    def __call__(self, episode: Episode) -> dict[str, float]:
        info = episode.infos.get("judge", {})
        if "solver_correct" not in info:
            return {}
        truth = bool(info["solver_correct"])
        self.counts[truth] += 1
        agreed = float(info["success"])
        return {"judge": agreed * (self.weight(truth) - 1.0)}

    def take_metrics(self) -> dict[str, float]:
        """``judge_balance/p_solver_correct``: the running share of right answers."""
        return {"judge_balance/p_solver_correct":
                self.counts[True] / sum(self.counts.values())}


def mostly_right_solver(accuracy: float, seed: int = 0) -> Any:
    """A warm-start player for the solver: the right ``Answer: n`` with probability
    ``accuracy``, else a near miss (off by 1-3), so the judge's demos see both classes."""
    import random

    from areal_agents.agents.players import arithmetic_solver

    rng = random.Random(seed)

    def player(observation: Any) -> str:
        right = arithmetic_solver(observation)
        if rng.random() < accuracy:
            return right
        return f"Answer: {int(right.removeprefix('Answer: ')) + rng.choice([-3, -2, -1, 1, 2, 3])}"

    return player


def make_trainer(args: argparse.Namespace, tally: JudgeTally) -> Any:
    """The two-policy run: ``solver`` and ``judge``, each its own tiny model and optimizer."""

    def policy(seed: int, max_tokens: int, sft_steps: int) -> aa.Policy:
        return aa.Policy(model="tiny:xs", seed=seed, lr=args.lr, api="completions",
                         sft_steps=sft_steps, sft_lr=3e-3,
                         sampling={"temperature": 1.0, "max_tokens": max_tokens, "stop": STOP})

    solver_demos: Any = ("random" if args.solver_demo_accuracy is None
                         else mostly_right_solver(args.solver_demo_accuracy, args.seed))
    reward_fns: list[Any] = [tally]
    if args.judge_reward == "balanced":
        reward_fns.append(BalancedJudgeReward())

    return aa.Trainer(
        env="SolverJudge-v0",
        env_kwargs={"task": "arithmetic", "digits": 1, "operations": "+-",
                    "truth_weight": args.truth_weight},
        policies={"solver": policy(args.seed, 6, args.solver_sft_steps or args.sft_steps),
                  "judge": policy(args.seed + 1, 3, args.sft_steps)},
        policy_map={"solver": "solver", "judge": "judge"}, reward_fns=reward_fns,
        batch_size=args.batch_size, group_size=args.group_size, seed=args.seed,
        eval_seeds=range(2_000_000, 2_000_000 + args.eval_seeds), progress=False,
        warm_start={"episodes": args.demos,
                    "players": {"solver": solver_demos, "judge": "solver_judge_judge"}},
        run_dir=args.run_dir)


async def evaluate(trainer: Any, tally: JudgeTally) -> dict[str, float]:
    """Greedy held-out episodes: ``eval/<agent>/{reward,success}`` + the judge's rates."""
    tally.take_metrics()  # drop counts of training episodes still in flight
    out = await trainer.evaluate()
    out.update({f"eval/{k}": v for k, v in tally.take_metrics().items()})
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm start, evaluate (step 0), train ``args.steps`` steps, evaluate; the figures."""
    tally = JudgeTally()
    trainer = make_trainer(args, tally)
    t0 = time.perf_counter()
    try:
        await trainer.setup()
        start = await evaluate(trainer, tally)
        trainer.logger.log(0, start)
        history = await trainer.afit(args.steps)
        final = await evaluate(trainer, tally)
        trainer.logger.log(trainer.step, final)
    finally:
        await trainer.aclose()
    keys = ("train/judge/success", "train/solver/success", "train/solver/reward",
            "judge_stats/false_positive_rate", "judge_stats/false_negative_rate")
    k = max(1, len(history) // 5)

    def mean(rows: list[dict[str, float]], key: str) -> float:
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"start": start, "final": final, "steps": len(history),
            "train_first": {key: mean(history[:k], key) for key in keys},
            "train_last": {key: mean(history[-k:], key) for key in keys},
            "per_step": [{"step": h["step"], **{key: h.get(key) for key in keys}}
                         for h in history],
            "seconds": time.perf_counter() - t0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/genrm_sj")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--sft-steps", type=int, default=100, help="warm-start SFT steps per policy")
    p.add_argument("--solver-sft-steps", type=int, default=0,
                   help="the solver's warm-start SFT steps (0: --sft-steps)")
    p.add_argument("--demos", type=int, default=256, help="warm-start episodes")
    p.add_argument("--solver-demo-accuracy", type=float, default=None,
                   help="solver demos right with this probability, else near misses (default: "
                   "the env's random replies)")
    p.add_argument("--judge-reward", choices=("agreement", "balanced"), default="agreement",
                   help="the judge's reward: agreement with ground truth, or class-balanced "
                   "(BalancedJudgeReward)")
    p.add_argument("--truth-weight", type=float, default=0.0,
                   help="solver reward = (1 - w) * verdict + w * ground truth")
    p.add_argument("--eval-seeds", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    Path(args.run_dir, "summary.json").write_text(json.dumps(result, indent=1))
    s, f = result["start"], result["final"]
    print(f"held-out (greedy, {args.eval_seeds} seeds), step 0 -> step {result['steps']}:")
    for label, key in (("judge accuracy", "eval/judge/success"),
                       ("judge false-positive rate", "eval/judge_stats/false_positive_rate"),
                       ("judge false-negative rate", "eval/judge_stats/false_negative_rate"),
                       ("solver true accuracy", "eval/solver/success"),
                       ("solver judged correct", "eval/solver/reward")):
        print(f"  {label:27s} {s.get(key, float('nan')):.3f} -> {f.get(key, float('nan')):.3f}")
    print(f"train (first/last fifth of steps): {json.dumps(result['train_first'])} -> "
          f"{json.dumps(result['train_last'])}")
    print(f"seconds: {result['seconds']:.0f}; metrics: {Path(args.run_dir) / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
