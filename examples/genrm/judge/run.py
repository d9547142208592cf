"""Arithmetic trained with a frozen LLM judge as the only reward, against the exact-match reward.

1. **The judge**: a tiny model (``tiny:xs``) fine-tuned by SFT on reference-guided judge
   transcripts ``(task, gold answer, answer) -> "yes" | "no"`` whose verdicts come from the
   env's ground truth (half the answers right; the rest off by 1-3 or without the
   ``Answer:`` format), rendered by the very ``ReferenceJudge`` used in RL; its grading
   accuracy is measured through a gateway, greedy, on held-out pairs.
2. **Two RL runs at equal steps** from the same SFT-warm-started policy (as in
   ``examples/arithmetic``): (a) the judge's score is the only reward (the env's reward is
   zeroed; ``info["success"]`` keeps the exact verdict, so held-out accuracy stays exact
   match), (b) the env's exact-match reward.

The judge model is saved in ``RUN_DIR/judge_model`` (``judge_reward.yaml`` names it as a
YAML ``reward_fns`` judge). Prints and writes ``RUN_DIR/summary.json``: judge accuracy, and per run held-out greedy
accuracy at step 0 and at the end, mean train reward of the first and last steps, judge
calls/cache hits/tokens per trained token, wall time.

Usage::

    OMP_NUM_THREADS=1 python examples/genrm/judge/run.py [--steps 40] [--run-dir DIR] ...
    OMP_NUM_THREADS=1 python examples/genrm/judge/run.py --judge-only   # judge SFT + accuracy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import areal_agents as aa
from areal_agents.envs.arithmetic import Arithmetic, make_task, prompt
from areal_agents.episode import Episode
from areal_agents.rewards import JudgeFailed, ReferenceJudge
from areal_agents.trainers.trainer import Trainer
from areal_agents.trainers.warm_start import demo_samples, sft
from areal_agents.trainers.wiring import backend_factory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/genrm: shared code
from policy_samples import sample_answers

ENV_KWARGS = {"digits": 1, "operations": "+-"}
JUDGE_TEMPLATE = "{task}\nReference: {reference}\n{answer}\nCorrect:"
SHORT_TEMPLATE = "Reference: {reference}\n{answer}\nCorrect:"
TEMPLATES = {"task": JUDGE_TEMPLATE, "short": SHORT_TEMPLATE}
"""``--judge-template``: with the task text, or only the gold answer and the answer."""
STOP = ["<|im_end|>"]
POLICY_SEEDS, HELD_OUT_POLICY_SEEDS = 4_000_000, 4_002_000
"""Task seeds of the policy answers the judge is trained on (``--policy-pairs``), and of
those it is graded on (``--policy-eval``)."""


class JudgedArithmetic(Arithmetic):
    """Arithmetic-v0 whose env reward is 0 (a judge gives the reward); ``info["success"]``
    keeps the exact-match verdict for evaluation."""

    async def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = await super().step(action)
        return obs, 0.0, terminated, truncated, {**info, "success": reward == 1.0}


def make_judge(name: str = "judge", template: str = JUDGE_TEMPLATE) -> ReferenceJudge:
    """The judge used in RL and measured: yes -> 1, no -> 0, unreadable replies counted, 0."""
    return ReferenceJudge(policy=name, api="completions", template=template, name=name,
                          on_failure="fallback", fallback=0.0, max_concurrency=32,
                          sampling={"max_tokens": 2, "stop": STOP})


def judge_pairs(seeds: range, rng: random.Random, near: float = 0.35, unformatted: float = 0.15
                ) -> list[tuple[Episode, bool]]:
    """One (episode, is_correct) per seed: the task of that seed, its gold answer in the info,
    and an answer that is off by 1-3 (a *near miss*, the hard negative) with probability
    ``near``, the right number without the ``Answer:`` format with probability
    ``unformatted``, else right (the defaults: right half the time)."""
    import numpy as np

    if near < 0 or unformatted < 0 or near + unformatted >= 1:
        raise ValueError(f"near={near}, unformatted={unformatted}: each must be >= 0 and their "
                         "sum < 1 (the rest are right answers)")
    out = []
    for seed in seeds:
        question, answer = make_task(np.random.default_rng(seed), **ENV_KWARGS)
        draw = rng.random()
        correct = draw < 1.0 - near - unformatted
        if correct:
            reply = f"Answer: {answer}"
        elif draw < 1.0 - unformatted:
            reply = f"Answer: {answer + rng.choice([-3, -2, -1, 1, 2, 3])}"
        else:
            reply = str(answer)
        messages = [{"role": "user", "content": prompt(question)},
                    {"role": "assistant", "content": reply}]
        out.append((Episode(["agent"], {"agent": messages}, {}, {"agent": 0.0}, 1, "terminated",
                            infos={"agent": {"answer": answer}}), correct))
    return out


def answer_kind(episode: Episode, correct: bool) -> str:
    """``"right"``, ``"near"`` (a wrong ``Answer: n``) or ``"unformatted"`` (no ``Answer:``),
    read from the agent's last assistant message (a played episode ends with env feedback)."""
    if correct:
        return "right"
    reply = [m for m in episode.messages["agent"] if m["role"] == "assistant"][-1]["content"]
    return "near" if reply.strip().startswith("Answer:") else "unformatted"


def train_judge(args: argparse.Namespace, extra: list[tuple[Episode, bool]] | None = None
                ) -> tuple[Any, Any, list[float]]:
    """SFT a tiny model (``args.judge_size``) on judge transcripts rendered by ``make_judge``:
    ``args.judge_pairs`` synthetic pairs with ``args.train_near`` near misses among them, plus
    ``extra`` (e.g. the policy's own labelled answers); (model, tokenizer, losses)."""
    model, tokenizer = aa.models.tiny(args.judge_size, seed=args.seed + 100)
    judge = make_judge(template=TEMPLATES[args.judge_template])
    pairs = judge_pairs(range(10_000, 10_000 + args.judge_pairs), random.Random(args.seed),
                        near=args.train_near, unformatted=args.train_unformatted)
    pairs += extra or []
    transcripts = [[{"role": "user", "content": judge.render(e, "agent")},
                    {"role": "assistant", "content": "yes" if ok else "no"}] for e, ok in pairs]
    samples = demo_samples(tokenizer, transcripts, api="completions")
    engine = backend_factory("fsdp")(model, lr=args.judge_lr)
    try:
        losses = sft(engine, samples, args.judge_sft_steps, batch_size=32, seed=args.seed,
                     pad_token_id=tokenizer.pad_token_id or 0)
    finally:
        engine.close()
    return model, tokenizer, losses


async def judge_accuracy(model: Any, tokenizer: Any, pairs: list[tuple[Episode, bool]],
                         template: str = JUDGE_TEMPLATE) -> dict[str, float]:
    """Greedy grading accuracy of the judge model on ``pairs`` (an unreadable reply counts as
    wrong), served as in RL: a gateway policy behind an in-process engine."""
    from areal_agents.engines.local import LocalEngine

    gateway = aa.Gateway()
    gateway.add_policy("judge", [LocalEngine(model, tokenizer)], tokenizer)
    judge = make_judge(template=template)
    judge.bind(gateway.async_client())
    try:
        return await _accuracy(judge, pairs)
    finally:
        await gateway.close()


async def _accuracy(judge: ReferenceJudge, pairs: list[tuple[Episode, bool]]
                    ) -> dict[str, float]:

    async def one(episode: Episode, correct: bool) -> bool:
        try:
            score = (await judge(episode))["agent"]
        except JudgeFailed:
            return False
        return (score >= 0.5) == correct

    right = await asyncio.gather(*(one(e, ok) for e, ok in pairs))
    m = judge.take_metrics()
    wrong_hits = [hit for (_, ok), hit in zip(pairs, right, strict=True) if not ok]
    by_kind: dict[str, list[bool]] = {}
    for (episode, ok), hit in zip(pairs, right, strict=True):
        by_kind.setdefault(answer_kind(episode, ok), []).append(hit)
    return {"accuracy": sum(right) / len(pairs), "pairs": float(len(pairs)),
            **{f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "wrong": float(len(wrong_hits)),
            "false_positive_rate": (1.0 - sum(wrong_hits) / len(wrong_hits)) if wrong_hits
            else float("nan"),
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
        reward_fns = [make_judge(template=TEMPLATES[args.judge_template])]
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


async def policy_answers(args: argparse.Namespace, run_dir: Path, seeds: Sequence[int],
                         samples: int = 1) -> list[tuple[Episode, bool]]:
    """The SFT-warm-started policy's own answers (temperature 1, as in RL), ``samples`` per
    seed, each labelled by exact match against the gold answer: (episode, is_correct)."""
    trainer = make_trainer("exact", None, args, run_dir / "policy_answers")
    try:
        await trainer.setup()
        return await sample_answers(trainer, lambda: Arithmetic(**ENV_KWARGS), seeds, samples)
    finally:
        await trainer.aclose()


def balance(pairs: list[tuple[Episode, bool]], rng: random.Random
            ) -> list[tuple[Episode, bool]]:
    """``pairs`` with the smaller class (right or wrong) resampled with replacement up to the
    size of the larger one, shuffled (unchanged when a class is empty)."""
    right = [p for p in pairs if p[1]]
    wrong = [p for p in pairs if not p[1]]
    if not right or not wrong:
        return list(pairs)
    small, big = sorted((right, wrong), key=len)
    out = big + small + rng.choices(small, k=len(big) - len(small))
    rng.shuffle(out)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The judge SFT, then both RL runs; writes ``summary.json`` under ``args.run_dir``.
    With ``args.exact_only``: only the exact-match RL run (no judge)."""
    run_dir = Path(args.run_dir)
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.exact_only:
        return _write({"exact_reward": await rl_run("exact", None, args, run_dir)}, args,
                      run_dir, t0)
    policy_held_out: list[tuple[Episode, bool]] = []
    policy_stats: dict[str, float] = {}
    if args.judge_from:  # a judge trained (and saved) by an earlier run: no SFT
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.judge_from).float()
        tokenizer, losses = AutoTokenizer.from_pretrained(args.judge_from), [float("nan")]
    else:
        extra: list[tuple[Episode, bool]] = []
        if args.policy_pairs or args.policy_eval:  # the policy's own answers, labelled
            if args.policy_pairs > HELD_OUT_POLICY_SEEDS - POLICY_SEEDS:
                raise ValueError(f"--policy-pairs {args.policy_pairs}: at most "
                                 f"{HELD_OUT_POLICY_SEEDS - POLICY_SEEDS}")
            answers = await policy_answers(args, run_dir, [
                *range(POLICY_SEEDS, POLICY_SEEDS + args.policy_pairs),
                *range(HELD_OUT_POLICY_SEEDS, HELD_OUT_POLICY_SEEDS + args.policy_eval)])
            train, policy_held_out = answers[:args.policy_pairs], answers[args.policy_pairs:]
            extra = balance(train, random.Random(args.seed + 2))
            policy_stats = {"policy_answers": float(len(train)),
                            "policy_right": float(sum(ok for _, ok in train)),
                            "balanced": float(len(extra))}
        model, tokenizer, losses = await asyncio.to_thread(train_judge, args, extra)
        model.save_pretrained(run_dir / "judge_model")  # for judge_reward.yaml / --judge-from
        tokenizer.save_pretrained(run_dir / "judge_model")
    held_out = judge_pairs(range(3_000_000, 3_000_000 + args.judge_eval_pairs),
                           random.Random(args.seed + 1))
    summary: dict[str, Any] = {"judge_sft": {"steps": len(losses), "nll_first": losses[0],
                                             "nll_last": losses[-1],
                                             "seconds": time.perf_counter() - t0},
                               "judge": await judge_accuracy(model, tokenizer, held_out,
                                                                  TEMPLATES[args.judge_template])}
    if policy_held_out:
        summary["judge_data"] = policy_stats
        summary["judge_policy"] = await judge_accuracy(model, tokenizer, policy_held_out,
                                                       TEMPLATES[args.judge_template])
        print(f"judge on held-out policy answers: {summary['judge_policy']}", flush=True)
    print(f"judge accuracy: {summary['judge']}", flush=True)
    if args.judge_only:
        return _write(summary, args, run_dir, t0)
    summary["judge_reward"] = await rl_run("judge", (model, tokenizer), args, run_dir)
    if not args.no_exact:
        summary["exact_reward"] = await rl_run("exact", None, args, run_dir)
    return _write(summary, args, run_dir, t0)


def _write(summary: dict[str, Any], args: argparse.Namespace, run_dir: Path, t0: float
           ) -> dict[str, Any]:
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
    p.add_argument("--judge-size", default="xs", help="tiny model size of the judge (xs, s, m)")
    p.add_argument("--judge-template", choices=sorted(TEMPLATES), default="task",
                   help="judge prompt: the task, gold answer and answer, or (short) only the "
                   "gold answer and the answer")
    p.add_argument("--judge-lr", type=float, default=3e-3, help="judge SFT learning rate")
    p.add_argument("--train-near", type=float, default=0.35,
                   help="share of near misses (hard negatives) in the judge's SFT data")
    p.add_argument("--train-unformatted", type=float, default=0.15,
                   help="share of unformatted right answers in the judge's SFT data")
    p.add_argument("--policy-pairs", type=int, default=0,
                   help="the starting policy's own labelled answers added (class-balanced) to "
                   "the judge's SFT data (0: synthetic pairs only)")
    p.add_argument("--policy-eval", type=int, default=0,
                   help="held-out answers of the starting policy the judge is graded on")
    p.add_argument("--judge-eval-pairs", type=int, default=200, help="held-out judge pairs")
    p.add_argument("--eval-seeds", type=int, default=200, help="held-out policy seeds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="runs/genrm_judge")
    p.add_argument("--judge-from", help="a judge_model directory of an earlier run (no SFT)")
    p.add_argument("--no-exact", action="store_true", help="skip the exact-match RL run")
    p.add_argument("--exact-only", action="store_true",
                   help="only the exact-match RL run (e.g. in parallel with a --no-exact run)")
    p.add_argument("--judge-only", action="store_true",
                   help="stop after the judge's SFT and accuracy (no RL runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = asyncio.run(run(args))
    if args.exact_only:
        r = s["exact_reward"]
        print(f"exact-match reward: held-out accuracy {r['heldout_start']:.3f} -> "
              f"{r['heldout_final']:.3f} in {r['steps']} steps; {r['seconds']:.0f} s")
        return 0
    acc = s["judge"]
    print(f"judge: SFT nll {s['judge_sft']['nll_first']:.3f} -> {s['judge_sft']['nll_last']:.3f};"
          f" held-out grading accuracy {acc['accuracy']:.3f} on {acc['pairs']:.0f} pairs "
          f"({acc['unreadable']:.0f} unreadable)")
    if args.judge_only:
        return 0
    j = s["judge_reward"]
    runs = [("judge reward", j)] + ([("exact-match reward", s["exact_reward"])]
                                    if "exact_reward" in s else [])
    for name, r in runs:
        print(f"{name:>18}: held-out accuracy {r['heldout_start']:.3f} -> "
              f"{r['heldout_final']:.3f} in {r['steps']} steps; train reward "
              f"{r['train_reward_first']:.3f} -> {r['train_reward_last']:.3f}; {r['seconds']:.0f} s")
    print(f"judge calls {j['judge_calls']:.0f}, cache hits {j['judge_cache_hits']:.0f}, "
          f"judge tokens per trained token {j['judge_tokens_per_trained_token']:.2f}")
    print(f"total {s['seconds_total']:.0f} s; summary: {Path(args.run_dir) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
