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

Round 4 options: ``--policy-seeds N`` adds pairs from the starting policy's own sampled
answers (per question, each distinct right reply against each distinct wrong one; held-out
policy pairs and the same-question ranking of held-out policy samples are reported);
``--gate`` / ``--normalize`` / ``--clip`` / ``--kl-coef`` / ``--rm-rounds`` guard RL against
exploiting the model; ``--reward exact`` runs the exact-match comparison arm instead.

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
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import areal_agents as aa
from areal_agents.envs.arithmetic import Arithmetic, make_task, parse_answer, prompt, score
from areal_agents.episode import Episode
from areal_agents.metrics import make_logger
from areal_agents.rewards.reward_model import (
    PreferencePair,
    RewardModel,
    RewardModelReward,
    evaluate_pairs,
    last_turn,
    pairs_from_episodes,
    read_pairs,
    train_reward_model,
    write_pairs,
)
from areal_agents.trainers.warm_start import demo_samples, sft
from areal_agents.trainers.wiring import backend_factory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/genrm: shared code
from policy_samples import sample_answers

ENV_KWARGS = {"digits": 1, "operations": "+-"}
STOP = ["<|im_end|>"]
KINDS = ("near", "far", "format")
POLICY_SEEDS, HELD_OUT_POLICY_SEEDS = 5_000_000, 5_100_000
"""Task seeds the starting policy is sampled on for train pairs (``--policy-seeds``) and for
held-out pairs (``--policy-eval-seeds``); the RL eval seeds are 2,000,000...."""


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


def pairs_step(args: argparse.Namespace, policy: dict[str, Any] | None = None
               ) -> dict[str, list[PreferencePair]]:
    """Write ``pairs/train.jsonl`` (scripted pairs of ``--train-tasks`` seeds, plus the
    policy's own train pairs when ``policy`` is given) and ``pairs/eval.jsonl`` (scripted
    held-out pairs; the policy's held-out pairs go to ``pairs/eval_policy.jsonl``); the
    held-out scripted pairs per kind."""
    out = Path(args.run_dir) / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    train = make_pairs(range(args.train_tasks), seed=args.seed, num_near=args.num_near) \
        if args.train_tasks else {k: [] for k in KINDS}
    held_out = make_pairs(range(3_000_000, 3_000_000 + args.eval_tasks), seed=args.seed + 1)
    extra = policy["train_pairs"] if policy else []
    write_pairs([p for k in KINDS for p in train[k]] + extra, out / "train.jsonl")
    write_pairs([p for k in KINDS for p in held_out[k]], out / "eval.jsonl")
    if policy:
        write_pairs(policy["held_out_pairs"], out / "eval_policy.jsonl")
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


def policy_pairs(answers: list[tuple[Episode, bool]],
                 exclude: set[tuple[str, str, str]] | None = None) -> list[PreferencePair]:
    """Distinct preference pairs from the policy's own labelled answers: per question (the same
    prompt, whatever the task seed), every distinct correct reply against every distinct wrong
    one (near misses and unformatted replies alike). Pairs whose ``key`` is in ``exclude``
    (e.g. the train pairs, when building held-out ones) are left out."""
    by_question = [dataclasses.replace(e, seed=question_of(e), returns={"agent": float(ok)})
                   for e, ok in answers]
    pairs = pairs_from_episodes(by_question, min_margin=0.5)
    return [p for p in pairs if key(p) not in (exclude or set())]


def question_of(episode: Episode) -> str:
    """The task text the agent answered (its first user message)."""
    return str(episode.messages["agent"][0]["content"])


def reply_of(episode: Episode, agent: str = "agent") -> str | None:
    """The agent's last reply (its last assistant message; env feedback after it is not)."""
    turn = last_turn(episode.messages.get(agent, []))
    return None if turn is None else str(turn[1])


def key(pair: PreferencePair) -> tuple[str, str, str]:
    """``(question, chosen, rejected)``: what makes a pair distinct."""
    return (json.dumps(pair.prompt), json.dumps(pair.chosen), json.dumps(pair.rejected))


def same_prompt_auc(rm: RewardModel, answers: list[tuple[Episode, bool]]) -> dict[str, float]:
    """How the reward model ranks the policy's correct against its wrong answers *to the same
    question*, weighted by how often the policy gives them (what a GRPO group compares):
    the fraction of (correct sample, wrong sample) pairs of one question with the correct one
    scored higher (ties count a half), over every question with both; also how many
    questions and sample pairs that covers."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for episode, ok in answers:
        reply = str(reply_of(episode))
        groups.setdefault(question_of(episode), ([], []))[0 if ok else 1].append(reply)
    mixed = {q: g for q, g in groups.items() if g[0] and g[1]}
    distinct = sorted({(q, r) for q, g in mixed.items() for r in g[0] + g[1]})
    scores = dict(zip(distinct, rm.score([q for q, _ in distinct], [r for _, r in distinct]),
                      strict=True))
    wins = total = 0.0
    for q, (right, wrong) in mixed.items():
        for c in right:
            for w in wrong:
                sc, sw = scores[(q, c)], scores[(q, w)]
                wins += 1.0 if sc > sw else 0.5 if sc == sw else 0.0
                total += 1.0
    return {"auc": wins / total if total else float("nan"), "questions": float(len(mixed)),
            "sample_pairs": total}


async def policy_step(args: argparse.Namespace) -> dict[str, Any]:
    """Sample the SFT-warm-started policy (the one RL starts from; temperature 1, as in RL) on
    ``--policy-seeds`` train seeds and ``--policy-eval-seeds`` held-out seeds,
    ``--policy-samples`` answers each; the distinct train pairs, the held-out pairs not among
    them, the held-out answers themselves, and counts."""
    trainer = make_trainer(args, None, "policy_samples")
    try:
        await trainer.setup()
        env = lambda: Arithmetic(**ENV_KWARGS)  # noqa: E731
        train = await sample_answers(trainer, env, range(POLICY_SEEDS, POLICY_SEEDS +
                                                         args.policy_seeds), args.policy_samples)
        held = await sample_answers(trainer, env, range(
            HELD_OUT_POLICY_SEEDS, HELD_OUT_POLICY_SEEDS + args.policy_eval_seeds),
            args.policy_samples)
    finally:
        await trainer.aclose()
    train_pairs = policy_pairs(train)
    held_pairs = policy_pairs(held, exclude={key(p) for p in train_pairs})
    unformatted = sum(parse_answer(reply_of(e)) is None for e, _ in train)
    return {"train_pairs": train_pairs, "held_out_pairs": held_pairs, "held_out_answers": held,
            "train_answers": train,
            "stats": {"train_answers": len(train), "train_right": sum(ok for _, ok in train),
                      "train_unformatted": unformatted, "train_pairs": len(train_pairs),
                      "held_out_answers": len(held),
                      "held_out_right": sum(ok for _, ok in held),
                      "held_out_pairs": len(held_pairs)}}


def reward_model_step(args: argparse.Namespace, held_out: dict[str, list[PreferencePair]],
                      policy: dict[str, Any] | None = None
                      ) -> tuple[RewardModel, dict[str, Any]]:
    """Train (or load, with ``--rm``) the reward model; its held-out figures. With ``policy``
    the held-out pairs evaluated during training are the policy's own (``eval_policy.jsonl``;
    the scripted ones if the policy gave no held-out pair), and the same-question ranking of the held-out policy answers is reported."""
    run_dir = Path(args.run_dir)
    t0 = time.perf_counter()
    policy_eval = bool(policy and policy["held_out_pairs"])
    eval_file = "eval_policy.jsonl" if policy_eval else "eval.jsonl"
    if args.rm:
        rm, history = RewardModel.load(args.rm), []
    else:
        logger = make_logger(run_dir / "rm", tensorboard=False)
        try:
            start = sft_initialised_rm(args) if args.rm_init == "sft" else args.rm_model
            rm = train_reward_model(read_pairs(run_dir / "pairs" / "train.jsonl"),
                                    model=start, steps=args.rm_steps, lr=args.rm_lr,
                                    batch_size=32, eval_pairs=read_pairs(run_dir / "pairs" /
                                                                         eval_file),
                                    eval_every=args.rm_eval_every, seed=args.seed, logger=logger)
        finally:
            logger.close()
        rm.save(run_dir / "rm")
        history = rm.history
    figures: dict[str, Any] = {
        "eval_accuracy_by_kind": {k: evaluate_pairs(rm, held_out[k])["accuracy"] for k in KINDS},
        "history": [{k: round(v, 4) for k, v in row.items()} for row in history],
        "seconds": time.perf_counter() - t0}
    if policy:
        figures["policy_data"] = policy["stats"]
        figures["policy_pairs_eval"] = evaluate_pairs(rm, policy["held_out_pairs"]) \
            if policy_eval else {}
        figures["policy_same_question"] = same_prompt_auc(rm, policy["held_out_answers"])
    return rm, figures


class GatedRewardModelReward(RewardModelReward):
    """``RewardModelReward`` with a format gate: a reply that is not ``Answer: <int>`` gets
    ``floor`` whatever the model scores it (the model still scores it, and counts it)."""

    def __init__(self, rm: RewardModel, *, floor: float, **kwargs: Any) -> None:
        super().__init__(rm, **kwargs)
        self.floor = floor
        self.num_gated = 0

    def _gate(self, episode: Episode, rewards: dict[str, float]) -> dict[str, float]:
        out = {}
        for agent, value in rewards.items():
            if parse_answer(reply_of(episode, agent)) is None:
                self.num_gated += 1
                value = self.floor
            out[agent] = value
        return out

    async def __call__(self, episode: Episode) -> dict[str, float]:
        return self._gate(episode, await super().__call__(episode))

    def score_episodes(self, episodes: Any) -> list[dict[str, float]]:
        return [self._gate(e, r) for e, r in zip(episodes, super().score_episodes(episodes),
                                                 strict=True)]


def make_reward(args: argparse.Namespace, rm: RewardModel) -> RewardModelReward:
    """The RL reward from the reward model: ``--normalize``, ``--clip`` and, with ``--gate``,
    ``--gate-floor`` for replies out of format."""
    kwargs: dict[str, Any] = {"normalize": args.normalize, "clip": args.clip}
    if args.gate:
        return GatedRewardModelReward(rm, floor=args.gate_floor, **kwargs)
    return RewardModelReward(rm, **kwargs)


def make_trainer(args: argparse.Namespace, reward: Any, name: str = "rl") -> aa.Trainer:
    """GRPO on the reward-free env with ``reward`` as the only reward (``reward=None``: the
    env's own exact-match reward, the comparison arm); the solver's KL penalty to its
    warm-started weights is ``args.kl_coef`` (the reference is the policy right after the
    warm start). Runs in ``RUN_DIR/<name>``."""
    exact = reward is None
    return aa.Trainer(
        env=(lambda: Arithmetic(**ENV_KWARGS)) if exact
        else (lambda: RewardFreeArithmetic(**ENV_KWARGS)),
        policies={"solver": aa.Policy(model="tiny:xs", seed=args.seed, lr=3e-4,
                                      api="completions", sft_steps=args.sft_steps, sft_lr=3e-3,
                                      algorithm_params={"kl_coef": args.kl_coef},
                                      sampling={"temperature": 1.0, "max_tokens": 6,
                                                "stop": STOP})},
        policy_map={"agent": "solver"}, reward_fns=[] if exact else [reward],
        batch_size=args.batch_size, group_size=args.group_size, seed=args.seed,
        progress=False, eval_seeds=range(2_000_000, 2_000_000 + args.eval_seeds),
        warm_start={"episodes": 256, "players": {"agent": "arithmetic_solver"}},
        run_dir=Path(args.run_dir) / name)


async def refresh_rm(args: argparse.Namespace, trainer: aa.Trainer, rm: RewardModel,
                     pairs: list[PreferencePair], round_: int) -> dict[str, Any]:
    """Iterated RM: sample the *current* policy on fresh seeds, add its distinct new pairs to
    ``pairs`` (in place) and train ``rm`` further on all of them (``--rm-refresh-steps``);
    the held-out accuracy on the fresh answers before the update is what RL was exploiting."""
    seeds = range(6_000_000 + round_ * 100_000,
                  6_000_000 + round_ * 100_000 + args.policy_seeds)
    answers = await sample_answers(trainer, lambda: Arithmetic(**ENV_KWARGS), seeds,
                                   args.policy_samples)
    seen = {key(p) for p in pairs}
    new = policy_pairs(answers, exclude=seen)
    before = same_prompt_auc(rm, answers)
    before_pairs = evaluate_pairs(rm, new) if new else {}
    pairs.extend(new)
    await asyncio.to_thread(train_reward_model, pairs, model=rm, steps=args.rm_refresh_steps,
                            lr=args.rm_lr, batch_size=32, eval_every=0, seed=args.seed + round_)
    return {"step": trainer.step, "answers": len(answers),
            "right": sum(ok for _, ok in answers), "new_pairs": len(new),
            "auc_before": before["auc"],
            "new_pair_accuracy_before": before_pairs.get("accuracy", float("nan")),
            "auc_after": same_prompt_auc(rm, answers)["auc"]}


async def rl_step(args: argparse.Namespace, rm: RewardModel | None) -> dict[str, Any]:
    """Warm start, evaluate (step 0), ``args.steps`` GRPO steps on the RM reward (``rm=None``:
    on exact match), evaluate. With ``--rm-rounds R > 1`` the reward model is re-trained on the
    current policy's answers after every ``steps / R`` steps."""
    reward = make_reward(args, rm) if rm is not None else None
    trainer = make_trainer(args, reward, "rl" if rm is not None else "rl_exact")
    t0 = time.perf_counter()
    refreshes: list[dict[str, Any]] = []
    try:
        await trainer.setup()
        start = await trainer.evaluate()
        if reward is not None:
            reward.take_metrics()  # per-step metrics count training episodes only
        trainer.logger.log(0, start)
        rounds = max(1, args.rm_rounds) if rm is not None else 1
        pairs = read_pairs(Path(args.run_dir) / "pairs" / "train.jsonl") if rounds > 1 else []
        history: list[dict[str, float]] = []
        for r in range(rounds):
            history = await trainer.afit(args.steps * (r + 1) // rounds)  # all steps
            if r + 1 < rounds:
                assert rm is not None
                refreshes.append(await refresh_rm(args, trainer, rm, pairs, r + 1))
                print(f"RM refresh {r + 1}: {refreshes[-1]}", flush=True)
        final = await trainer.evaluate()
        trainer.logger.log(trainer.step, final)
    finally:
        await trainer.aclose()
    rewards = [h["policy/solver/reward"] for h in history]
    success = [h.get("train/agent/success", float("nan")) for h in history]
    k = max(1, len(rewards) // 10)
    out = {"heldout_exact_match_start": start["eval/agent/success"],
           "heldout_exact_match_final": final["eval/agent/success"],
           "heldout_rm_reward_start": start["eval/agent/reward"],
           "heldout_rm_reward_final": final["eval/agent/reward"],
           "train_rm_reward_first": sum(rewards[:k]) / k,
           "train_rm_reward_last": sum(rewards[-k:]) / k,
           "train_reward_windows": [round(sum(rewards[i:i + k]) / len(rewards[i:i + k]), 3)
                                    for i in range(0, len(rewards), k)],
           "train_exact_match_windows": [round(sum(success[i:i + k]) / len(success[i:i + k]), 3)
                                         for i in range(0, len(success), k)],
           "kl_coef": args.kl_coef,
           "train_kl_last": sum(h.get("policy/solver/kl", 0.0) for h in history[-k:]) / k,
           "steps": len(history), "seconds": time.perf_counter() - t0,
           "rm_refreshes": refreshes}
    if isinstance(reward, GatedRewardModelReward):
        out["gated_replies"] = reward.num_gated
    return out


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
    p.add_argument("--policy-seeds", type=int, default=0,
                   help="task seeds the starting policy is sampled on for train pairs "
                   "(0: scripted pairs only)")
    p.add_argument("--policy-samples", type=int, default=4, help="answers per policy seed")
    p.add_argument("--policy-eval-seeds", type=int, default=200,
                   help="held-out seeds of policy answers (with --policy-seeds)")
    p.add_argument("--reward", choices=("rm", "exact"), default="rm",
                   help="RL reward: the reward model only, or the env's exact match (the "
                   "comparison arm: no reward model is built)")
    p.add_argument("--normalize", choices=("none", "running", "sigmoid"), default="none",
                   help="RewardModelReward normalisation of the RM score")
    p.add_argument("--clip", type=float, default=None, help="clip the (normalised) RM reward")
    p.add_argument("--gate", action="store_true",
                   help="format gate: a reply that is not 'Answer: <int>' gets --gate-floor")
    p.add_argument("--gate-floor", type=float, default=-3.0)
    p.add_argument("--rm-rounds", type=int, default=1,
                   help="iterated RM: re-train it on fresh answers of the current policy "
                   "this many times minus one during RL (1: never)")
    p.add_argument("--rm-refresh-steps", type=int, default=100,
                   help="reward-model steps of each refresh (--rm-rounds)")
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
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    if args.reward == "exact":
        rl = asyncio.run(rl_step(args, None))
        summary = {"rl_exact": rl, "args": vars(args), "seconds": time.perf_counter() - t0}
        (Path(args.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"RL with the exact-match reward: held-out exact match "
              f"{rl['heldout_exact_match_start']:.3f} -> {rl['heldout_exact_match_final']:.3f} "
              f"in {rl['steps']} steps; {rl['seconds']:.0f} s")
        return 0
    policy = asyncio.run(policy_step(args)) if args.policy_seeds else None
    if policy:
        print(f"policy answers: {policy['stats']}", flush=True)
    held_out = pairs_step(args, policy)
    if args.pairs_only:
        print(f"pairs: {Path(args.run_dir) / 'pairs'}")
        return 0
    rm, rm_figures = reward_model_step(args, held_out, policy)
    summary: dict[str, Any] = {"reward_model": rm_figures, "args": vars(args)}
    (Path(args.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    hist = rm_figures["history"]
    if hist:
        print(f"reward model held-out pair accuracy {hist[0]['rm/eval_accuracy']:.3f} -> "
              f"{hist[-1]['rm/eval_accuracy']:.3f} in {args.rm_steps} steps", flush=True)
    print("  scripted pairs by rejected kind: " + ", ".join(
        f"{k} {v:.3f}" for k, v in rm_figures["eval_accuracy_by_kind"].items()))
    if policy:
        print(f"  held-out policy pairs: {rm_figures['policy_pairs_eval']}; same-question "
              f"ranking of policy answers: {rm_figures['policy_same_question']}", flush=True)
    rl = asyncio.run(rl_step(args, rm))
    summary.update({"rl": rl, "seconds": time.perf_counter() - t0})
    (Path(args.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"RL with the reward model only: held-out exact match "
          f"{rl['heldout_exact_match_start']:.3f} -> {rl['heldout_exact_match_final']:.3f} in "
          f"{rl['steps']} steps; train RM reward {rl['train_rm_reward_first']:.3f} -> "
          f"{rl['train_rm_reward_last']:.3f}")
    print(f"seconds: total {summary['seconds']:.0f} (RM {rm_figures['seconds']:.0f}, "
          f"RL {rl['seconds']:.0f}); summary: {Path(args.run_dir) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
