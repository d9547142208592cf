"""Arithmetic trained with a frozen LLM judge as the only reward, against the exact-match reward.

1. **The judge**: a tiny model (``tiny:xs``) fine-tuned by SFT on judge transcripts
   ``(task, answer) -> "1" | "0"`` whose verdicts come from the env's ground truth (half the
   answers right, half off by 1-3), rendered by the very ``RubricJudge`` used in RL; its
   grading accuracy is measured through the gateway, greedy, on held-out pairs.
2. **Two RL runs at equal steps** from the same SFT-warm-started policy (as in
   ``examples/arithmetic``): (a) the judge's score is the only reward (the env's reward is
   zeroed; ``info["success"]`` keeps the exact verdict, so held-out accuracy stays exact
   match), (b) the env's exact-match reward.

Prints and writes ``RUN_DIR/summary.json``: judge accuracy, and per run held-out greedy
accuracy at step 0 and at the end, mean train reward of the first and last steps, judge
calls/cache hits/tokens per trained token, wall time.

Usage::

    OMP_NUM_THREADS=1 python examples/genrm/judge/run.py [--steps 40] [--run-dir DIR] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import areal_agents as aa
from areal_agents.envs.arithmetic import Arithmetic, make_task, prompt
from areal_agents.episode import Episode
from areal_agents.rewards import JudgeFailed, RubricJudge
from areal_agents.trainers.trainer import Trainer
from areal_agents.trainers.warm_start import demo_samples, sft
from areal_agents.trainers.wiring import backend_factory

ENV_KWARGS = {"digits": 1, "operations": "+-"}
JUDGE_TEMPLATE = "{task}\n{answer}\nScore (0-1):"
STOP = ["<|im_end|>"]


class JudgedArithmetic(Arithmetic):
    """Arithmetic-v0 whose env reward is 0 (a judge gives the reward); ``info["success"]``
    keeps the exact-match verdict for evaluation."""

    async def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = await super().step(action)
        return obs, 0.0, terminated, truncated, {**info, "success": reward == 1.0}


def make_judge(name: str = "judge") -> RubricJudge:
    """The judge used in RL and measured: a 0/1 score, unreadable replies counted and 0."""
    return RubricJudge("", policy=name, api="completions", template=JUDGE_TEMPLATE,
                       scale=(0, 1), name=name, on_failure="fallback", fallback=0.0,
                       sampling={"max_tokens": 2, "stop": STOP}, max_concurrency=32)


def judge_pairs(seeds: range, rng: random.Random) -> list[tuple[Episode, bool]]:
    """One (episode, is_correct) per seed: the task of that seed and an answer that is right
    half the time, else off by 1-3."""
    import numpy as np

    out = []
    for seed in seeds:
        question, answer = make_task(np.random.default_rng(seed), **ENV_KWARGS)
        correct = rng.random() < 0.5
        given = answer if correct else answer + rng.choice([-3, -2, -1, 1, 2, 3])
        messages = [{"role": "user", "content": prompt(question)},
                    {"role": "assistant", "content": f"Answer: {given}"}]
        out.append((Episode(["agent"], {"agent": messages}, {}, {"agent": 0.0}, 1, "terminated"),
                    correct))
    return out


def train_judge(steps: int, num_pairs: int, seed: int) -> tuple[Any, Any, list[float]]:
    """SFT a tiny model on judge transcripts rendered by ``make_judge``; (model, tok, losses)."""
    model, tokenizer = aa.models.tiny("xs", seed=seed + 100)
    judge = make_judge()
    transcripts = [[{"role": "user", "content": judge.render(e, "agent")},
                    {"role": "assistant", "content": "1" if ok else "0"}]
                   for e, ok in judge_pairs(range(10_000, 10_000 + num_pairs),
                                            random.Random(seed))]
    samples = demo_samples(tokenizer, transcripts, api="completions")
    engine = backend_factory("fsdp")(model, lr=3e-3)
    try:
        losses = sft(engine, samples, steps, batch_size=32, seed=seed,
                     pad_token_id=tokenizer.pad_token_id or 0)
    finally:
        engine.close()
    return model, tokenizer, losses


async def judge_accuracy(judge: RubricJudge, pairs: list[tuple[Episode, bool]]) -> dict[str, float]:
    """Greedy grading accuracy on ``pairs`` (an unreadable reply counts as wrong)."""
    judge.take_metrics()

    async def one(episode: Episode, correct: bool) -> bool:
        try:
            score = (await judge(episode))["agent"]
        except JudgeFailed:
            return False
        return (score >= 0.5) == correct

    right = await asyncio.gather(*(one(e, ok) for e, ok in pairs))
    m = judge.take_metrics()
    return {"accuracy": sum(right) / len(pairs), "pairs": float(len(pairs)),
            "unreadable": m[f"judge/{judge.name}/parse_failures"]
            + m[f"judge/{judge.name}/out_of_range"]}


def make_trainer(reward: str, judge_model: Any, args: argparse.Namespace, run_dir: Path
                 ) -> Trainer:
    """The RL run: ``reward`` is "judge" (the judge's score only) or "exact" (the env's)."""
    policies = {"solver": aa.Policy(model="tiny:xs", seed=args.seed, lr=3e-4, api="completions",
                                    sampling={"temperature": 1.0, "max_tokens": 6, "stop": STOP},
                                    sft_steps=args.policy_sft_steps, sft_lr=3e-3)}
    reward_fns: list[Any] = []
    if reward == "judge":
        policies["judge"] = aa.Policy(model=judge_model, frozen=True, api="completions")
        reward_fns = [make_judge()]
        env: Any = lambda: JudgedArithmetic(**ENV_KWARGS)  # noqa: E731
    else:
        env = lambda: Arithmetic(**ENV_KWARGS)  # noqa: E731
    return Trainer(env=env, policies=policies, policy_map={"agent": "solver"},
                   reward_fns=reward_fns, batch_size=args.batch_size, group_size=args.group_size,
                   eval_seeds=range(2_000_000, 2_000_000 + args.eval_seeds), seed=args.seed,
                   warm_start={"episodes": 256, "players": {"agent": "arithmetic_solver"}},
                   run_dir=run_dir / reward, progress=False)


async def rl_run(reward: str, judge_model: Any, args: argparse.Namespace, run_dir: Path
                 ) -> dict[str, Any]:
    """Warm start, evaluate (step 0), ``args.steps`` GRPO steps, evaluate; the figures."""
    t0 = time.perf_counter()
    trainer = make_trainer(reward, judge_model, args, run_dir)
    try:
        await trainer.setup()
        out: dict[str, Any] = {}
        if reward == "judge":
            held_out = judge_pairs(range(3_000_000, 3_000_000 + args.judge_eval_pairs),
                                   random.Random(args.seed + 1))
            out["judge"] = await judge_accuracy(trainer.rewards.reward_fns[0], held_out)
        start = (await trainer.evaluate())["eval/agent/success"]
        history = await trainer.afit(args.steps)
        final = (await trainer.evaluate())["eval/agent/success"]
    finally:
        await trainer.aclose()
    rewards = [h["policy/solver/reward"] for h in history]
    k = max(1, len(rewards) // 5)
    out.update({"heldout_start": start, "heldout_final": final, "steps": len(history),
                "train_reward_first": sum(rewards[:k]) / k,
                "train_reward_last": sum(rewards[-k:]) / k,
                "seconds": time.perf_counter() - t0})
    if reward == "judge":
        for key in ("calls", "cache_hits", "parse_failures", "tokens"):
            out[f"judge_{key}"] = sum(h.get(f"judge/judge/{key}", 0.0) for h in history)
        trained = sum(h["policy/solver/num_samples"] * h["policy/solver/trained_gen_len"]
                      for h in history)
        out["judge_tokens_per_trained_token"] = out["judge_tokens"] / max(trained, 1.0)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The judge SFT, then both RL runs; writes ``summary.json`` under ``args.run_dir``."""
    run_dir = Path(args.run_dir)
    t0 = time.perf_counter()
    model, tokenizer, losses = await asyncio.to_thread(
        train_judge, args.judge_sft_steps, args.judge_pairs, args.seed)
    summary: dict[str, Any] = {"judge_sft": {"steps": len(losses), "nll_first": losses[0],
                                             "nll_last": losses[-1],
                                             "seconds": time.perf_counter() - t0}}
    summary["judge_reward"] = await rl_run("judge", (model, tokenizer), args, run_dir)
    summary["exact_reward"] = await rl_run("exact", None, args, run_dir)
    summary["seconds_total"] = time.perf_counter() - t0
    summary["args"] = vars(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="GRPO steps of each RL run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--policy-sft-steps", type=int, default=200)
    p.add_argument("--judge-sft-steps", type=int, default=400)
    p.add_argument("--judge-pairs", type=int, default=2000, help="judge SFT transcripts")
    p.add_argument("--judge-eval-pairs", type=int, default=200, help="held-out judge pairs")
    p.add_argument("--eval-seeds", type=int, default=200, help="held-out policy seeds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="runs/genrm_judge")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = asyncio.run(run(args))
    j, e, acc = s["judge_reward"], s["exact_reward"], s["judge_reward"]["judge"]
    print(f"judge: SFT nll {s['judge_sft']['nll_first']:.3f} -> {s['judge_sft']['nll_last']:.3f};"
          f" held-out grading accuracy {acc['accuracy']:.3f} on {acc['pairs']:.0f} pairs "
          f"({acc['unreadable']:.0f} unreadable)")
    for name, r in (("judge reward", j), ("exact-match reward", e)):
        print(f"{name:>18}: held-out accuracy {r['heldout_start']:.3f} -> "
              f"{r['heldout_final']:.3f} in {r['steps']} steps; train reward "
              f"{r['train_reward_first']:.3f} -> {r['train_reward_last']:.3f}; {r['seconds']:.0f} s")
    print(f"judge calls {j['judge_calls']:.0f}, cache hits {j['judge_cache_hits']:.0f}, "
          f"judge tokens per trained token {j['judge_tokens_per_trained_token']:.2f}")
    print(f"total {s['seconds_total']:.0f} s; summary: {Path(args.run_dir) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
