"""Bradley-Terry reward model on Arithmetic: preference pairs -> reward model -> RL with it.

1. **Pairs.** For each task seed, scripted replies are scored by the env's ground truth
   (``arithmetic.score``) and turned into chosen/rejected pairs per seed with
   ``pairs_from_episodes``: the correct ``Answer: n`` against a near miss (off by 1-3), a far
   wrong number, and the right number out of format. Written to ``RUN_DIR/pairs/*.jsonl``.
2. **Reward model.** ``train_reward_model`` (the same code as ``areal-agents train-rm``) on the
   train pairs; held-out pair accuracy before, during and after, also per kind of rejected
   reply. ``--rm DIR`` uses a model trained with the CLI instead.
3. **RL.** GRPO on Arithmetic-v0 (one-digit ``+``/``-``, the ``examples/arithmetic`` SFT warm
   start) where the reward model's score is the *only* reward (the env's reward is zeroed;
   ``info["success"]`` keeps exact match for evaluation). Held-out greedy exact-match accuracy
   at step 0 (after the warm start) and at the end.

Usage::

    OMP_NUM_THREADS=1 python examples/genrm/bradley_terry/run.py --run-dir runs/genrm_bt
    # or the reward model with the CLI, then RL with it:
    python examples/genrm/bradley_terry/run.py --run-dir runs/genrm_bt --pairs-only
    areal-agents train-rm --pairs runs/genrm_bt/pairs/train.jsonl \
        --eval-pairs runs/genrm_bt/pairs/eval.jsonl --model tiny:xs --out runs/genrm_bt/rm \
        --steps 400 --lr 1e-3 --batch-size 32
    python examples/genrm/bradley_terry/run.py --run-dir runs/genrm_bt --rm runs/genrm_bt/rm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

import areal_agents as aa
from areal_agents.envs.arithmetic import Arithmetic, make_task, prompt, score
from areal_agents.episode import Episode
from areal_agents.metrics import make_logger
from areal_agents.rewards.reward_model import (
    PreferencePair,
    RewardModel,
    RewardModelReward,
    evaluate_pairs,
    pairs_from_episodes,
    read_pairs,
    train_reward_model,
    write_pairs,
)
from areal_agents.trainers.warm_start import demo_samples, sft
from areal_agents.trainers.wiring import backend_factory

ENV_KWARGS = {"digits": 1, "operations": "+-"}
STOP = ["<|im_end|>"]
KINDS = ("near", "far", "format")


class RewardFreeArithmetic(Arithmetic):
    """Arithmetic-v0 whose env reward is 0 (the reward model gives the reward);
    ``info["success"]`` keeps the exact-match verdict for evaluation."""

    async def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = await super().step(action)
        return obs, 0.0, terminated, truncated, {**info, "success": reward == 1.0}


def replies(answer: int, rng: random.Random, num_near: int = 1) -> dict[str, list[str]]:
    """The correct reply and the rejected replies of each kind: ``num_near`` distinct near
    misses (off by 1-3), one far wrong number, the right number out of format."""
    far = answer
    while abs(far - answer) <= 3:
        far = rng.randint(-9, 18)
    near = rng.sample([-3, -2, -1, 1, 2, 3], num_near)
    return {"correct": [f"Answer: {answer}"],
            "near": [f"Answer: {answer + d}" for d in near],
            "far": [f"Answer: {far}"], "format": [f"I think {answer}"]}


def make_pairs(seeds: range, seed: int = 0, num_near: int = 1
               ) -> dict[str, list[PreferencePair]]:
    """Pairs per kind of rejected reply, harvested from ground-truth-scored episodes
    (``num_near`` near-miss pairs per task seed: the hard negatives)."""
    if not 1 <= num_near <= 6:
        raise ValueError(f"num_near={num_near}: there are 6 near misses (off by 1-3); pick 1-6")
    rng = random.Random(seed)
    by_kind: dict[str, list[PreferencePair]] = {k: [] for k in KINDS}
    for task_seed in seeds:
        question, answer = make_task(np.random.default_rng(task_seed), **ENV_KWARGS)
        for kind, rejected in replies(answer, rng, num_near).items():
            if kind == "correct":
                continue
            for reply in rejected:
                episodes = [
                    Episode(["agent"],
                            {"agent": [{"role": "user", "content": prompt(question)},
                                       {"role": "assistant", "content": text}]},
                            {}, {"agent": score(text, answer)[0]}, 1, "terminated",
                            seed=task_seed)
                    for text in (f"Answer: {answer}", reply)]
                by_kind[kind].extend(pairs_from_episodes(episodes))
    return by_kind


def pairs_step(args: argparse.Namespace) -> dict[str, list[PreferencePair]]:
    """Write ``pairs/train.jsonl`` and ``pairs/eval.jsonl``; the held-out pairs per kind."""
    out = Path(args.run_dir) / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    train = make_pairs(range(args.train_tasks), seed=args.seed, num_near=args.num_near)
    held_out = make_pairs(range(3_000_000, 3_000_000 + args.eval_tasks), seed=args.seed + 1)
    write_pairs([p for k in KINDS for p in train[k]], out / "train.jsonl")
    write_pairs([p for k in KINDS for p in held_out[k]], out / "eval.jsonl")
    return held_out


def sft_initialised_rm(args: argparse.Namespace) -> RewardModel:
    """A reward model whose backbone is a policy SFT-trained on the scripted solver's answers
    (``--rm-init sft``: InstructGPT's recipe of starting the RM from the SFT model), rendered
    with the chat template the reward model reads; its score head is new."""
    model, tokenizer = aa.models.tiny(args.rm_model.removeprefix("tiny:"), seed=args.seed + 200)
    transcripts = []
    for task_seed in range(args.train_tasks):
        question, answer = make_task(np.random.default_rng(task_seed), **ENV_KWARGS)
        transcripts.append([{"role": "user", "content": prompt(question)},
                            {"role": "assistant", "content": f"Answer: {answer}"}])
    engine = backend_factory("fsdp")(model, lr=3e-3)
    try:
        sft(engine, demo_samples(tokenizer, transcripts, api="chat"), args.rm_sft_steps,
            batch_size=32, seed=args.seed, pad_token_id=tokenizer.pad_token_id or 0)
    finally:
        engine.close()
    rm = RewardModel.from_pretrained(args.rm_model, seed=args.seed)
    base = rm.model.base_model_prefix
    getattr(rm.model, base).load_state_dict(getattr(model, base).state_dict())
    return rm


def reward_model_step(args: argparse.Namespace, held_out: dict[str, list[PreferencePair]]
                      ) -> tuple[RewardModel, dict[str, Any]]:
    """Train (or load, with ``--rm``) the reward model; its held-out figures."""
    run_dir = Path(args.run_dir)
    t0 = time.perf_counter()
    if args.rm:
        rm, history = RewardModel.load(args.rm), []
    else:
        logger = make_logger(run_dir / "rm", tensorboard=False)
        try:
            start = sft_initialised_rm(args) if args.rm_init == "sft" else args.rm_model
            rm = train_reward_model(read_pairs(run_dir / "pairs" / "train.jsonl"),
                                    model=start, steps=args.rm_steps, lr=args.rm_lr,
                                    batch_size=32, eval_pairs=read_pairs(run_dir / "pairs" /
                                                                         "eval.jsonl"),
                                    eval_every=args.rm_eval_every, seed=args.seed, logger=logger)
        finally:
            logger.close()
        rm.save(run_dir / "rm")
        history = rm.history
    figures: dict[str, Any] = {
        "eval_accuracy_by_kind": {k: evaluate_pairs(rm, held_out[k])["accuracy"] for k in KINDS},
        "history": [{k: round(v, 4) for k, v in row.items()} for row in history],
        "seconds": time.perf_counter() - t0}
    return rm, figures


def make_trainer(args: argparse.Namespace, reward: Any) -> aa.Trainer:
    """GRPO on the reward-free env with ``reward`` as the only reward; the solver's KL penalty
    to its warm-started weights is ``args.kl_coef`` (the reference is the policy right after
    the warm start)."""
    return aa.Trainer(
        env=lambda: RewardFreeArithmetic(**ENV_KWARGS),
        policies={"solver": aa.Policy(model="tiny:xs", seed=args.seed, lr=3e-4,
                                      api="completions", sft_steps=args.sft_steps, sft_lr=3e-3,
                                      algorithm_params={"kl_coef": args.kl_coef},
                                      sampling={"temperature": 1.0, "max_tokens": 6,
                                                "stop": STOP})},
        policy_map={"agent": "solver"}, reward_fns=[reward], batch_size=args.batch_size,
        group_size=args.group_size, seed=args.seed, progress=False,
        eval_seeds=range(2_000_000, 2_000_000 + args.eval_seeds),
        warm_start={"episodes": 256, "players": {"agent": "arithmetic_solver"}},
        run_dir=Path(args.run_dir) / "rl")


async def rl_step(args: argparse.Namespace, rm: RewardModel) -> dict[str, Any]:
    """Warm start, evaluate (step 0), ``args.steps`` GRPO steps on the RM reward, evaluate."""
    reward = RewardModelReward(rm, normalize="none")
    trainer = make_trainer(args, reward)
    t0 = time.perf_counter()
    try:
        await trainer.setup()
        start = await trainer.evaluate()
        reward.take_metrics()  # per-step metrics count training episodes only
        trainer.logger.log(0, start)
        history = await trainer.afit(args.steps)
        final = await trainer.evaluate()
        trainer.logger.log(trainer.step, final)
    finally:
        await trainer.aclose()
    rewards = [h["policy/solver/reward"] for h in history]
    k = max(1, len(rewards) // 5)
    return {"heldout_exact_match_start": start["eval/agent/success"],
            "heldout_exact_match_final": final["eval/agent/success"],
            "heldout_rm_reward_start": start["eval/agent/reward"],
            "heldout_rm_reward_final": final["eval/agent/reward"],
            "train_rm_reward_first": sum(rewards[:k]) / k,
            "train_rm_reward_last": sum(rewards[-k:]) / k,
            "kl_coef": args.kl_coef,
            "train_kl_last": sum(h.get("policy/solver/kl", 0.0) for h in history[-k:]) / k,
            "steps": len(history), "seconds": time.perf_counter() - t0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/genrm_bt")
    p.add_argument("--train-tasks", type=int, default=2000, help="task seeds of train pairs")
    p.add_argument("--eval-tasks", type=int, default=200, help="task seeds of held-out pairs")
    p.add_argument("--pairs-only", action="store_true", help="write the pairs and stop")
    p.add_argument("--rm", help="a reward model directory (from train-rm) instead of training")
    p.add_argument("--rm-model", default="tiny:xs", help="the reward model's starting weights")
    p.add_argument("--rm-init", choices=("scratch", "sft"), default="scratch",
                   help="reward-model backbone: fresh, or a policy SFT-trained on right answers")
    p.add_argument("--rm-sft-steps", type=int, default=200, help="SFT steps of --rm-init sft")
    p.add_argument("--num-near", type=int, default=1,
                   help="near-miss (hard negative) train pairs per task seed, 1-6")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="KL penalty to the warm-started policy in RL (the anchor against "
                   "reward hacking; 0: none)")
    p.add_argument("--rm-steps", type=int, default=400)
    p.add_argument("--rm-lr", type=float, default=1e-3)
    p.add_argument("--rm-eval-every", type=int, default=100)
    p.add_argument("--steps", type=int, default=100, help="GRPO steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--sft-steps", type=int, default=200, help="policy warm-start SFT steps")
    p.add_argument("--eval-seeds", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    held_out = pairs_step(args)
    if args.pairs_only:
        print(f"pairs: {Path(args.run_dir) / 'pairs'}")
        return 0
    rm, rm_figures = reward_model_step(args, held_out)
    rl = asyncio.run(rl_step(args, rm))
    summary = {"reward_model": rm_figures, "rl": rl, "seconds": time.perf_counter() - t0}
    (Path(args.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    hist = rm_figures["history"]
    if hist:
        print(f"reward model held-out pair accuracy {hist[0]['rm/eval_accuracy']:.3f} -> "
              f"{hist[-1]['rm/eval_accuracy']:.3f} in {args.rm_steps} steps")
    print("  by rejected kind: " + ", ".join(
        f"{k} {v:.3f}" for k, v in rm_figures["eval_accuracy_by_kind"].items()))
    print(f"RL with the reward model only: held-out exact match "
          f"{rl['heldout_exact_match_start']:.3f} -> {rl['heldout_exact_match_final']:.3f} in "
          f"{rl['steps']} steps; train RM reward {rl['train_rm_reward_first']:.3f} -> "
          f"{rl['train_rm_reward_last']:.3f}")
    print(f"seconds: total {summary['seconds']:.0f} (RM {rm_figures['seconds']:.0f}, "
          f"RL {rl['seconds']:.0f}); summary: {Path(args.run_dir) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
