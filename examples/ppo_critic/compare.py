"""PPO with a learned critic at ``group_size=1`` vs GRPO with groups, at equal episodes.

The task is multi-step with a reward every step: ``Signaling-v0`` with ``rounds`` rounds, a tiny
LLM speaker and a scripted listener that decodes ``message: d`` as the d-th letter (the code the
speaker must learn). Each round pays 1 when the listener picks the target, so an episode's
return counts the rounds won (0..rounds); each round's prompt reports the last round's result.
Each round's reward sits on the last token of the speaker's action of that round
(``Sample.token_rewards``), so PPO's GAE sees when it was earned; GRPO uses the episode return.

Arms (same model, warm start, learning rate, ``batch_size`` episodes per step, same steps):

* ``grpo``: GRPO, ``group_size`` episodes per task seed (it needs groups: with one episode per
  seed every advantage is 0, which ``check_group_size`` refuses);
* ``ppo_critic``: PPO (GAE, ``gamma=1``, ``gae_lambda``) with a learned critic
  (``Policy(critic=...)``), one episode per task seed (``group_size=1``: ``batch_size``
  different tasks per step);
* ``ppo``: the same PPO without a critic (values 0: whitened returns), ``group_size=1``.

Reported per arm: the sampled reward per step (``train/speaker/reward``), greedy success on
held-out seeds before and after training, the critic's explained variance, wall time. Results go
to ``RUN_DIR/results.json``.

Usage::

    OMP_NUM_THREADS=1 python examples/ppo_critic/compare.py [--steps 40] [--arms grpo,ppo_critic]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from areal_agents.agents import ScriptedAgent
from areal_agents.algorithms import GRPO, PPO
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

ARMS = ("grpo", "ppo_critic", "ppo")


def decode_listener(observation: Any) -> str:
    """Reads ``message: d`` and picks the d-th letter (A = 0): the fixed code to learn."""
    text = observation[-1]["content"] if isinstance(observation, list) else str(observation)
    message = text.rsplit("message:", 1)[-1].strip()
    return chr(ord("A") + int(message)) if message.isdigit() else "A"


def build(arm: str, *, batch_size: int = 16, group_size: int = 4, rounds: int = 3,
          num_items: int = 4, lr: float = 3e-3, critic_lr: float = 1e-3, gae_lambda: float = 0.95,
          critic_updates: int = 1, critic_warmup: int = 0, entropy_coef: float = 0.0,
          kl_coef: float = 0.0,
          sft_steps: int = 60, eval_seeds: int = 32, seed: int = 0,
          run_dir: str | Path | None = None) -> Trainer:
    """The ``Trainer`` of one arm (not set up yet).

    ``critic_lr``, ``critic_updates`` (optimizer steps per batch) and ``critic_warmup`` (steps
    that train the critic alone, the policy held) set the ``ppo_critic`` arm's ``CriticSpec``;
    ``entropy_coef`` is every arm's entropy bonus, ``kl_coef`` every arm's KL penalty to the
    warm-started policy (k3, in the loss).

    Raises:
        ValueError: unknown arm.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")
    critic = ({"lr": critic_lr, "num_updates": critic_updates, "warmup_steps": critic_warmup}
              if arm == "ppo_critic" else None)
    regularise = {"entropy_coef": entropy_coef, "kl_coef": kl_coef}
    algorithm = (GRPO(**regularise) if arm == "grpo"
                 else PPO(gamma=1.0, gae_lambda=gae_lambda, **regularise))
    listener = ScriptedAgent(decode_listener)
    return Trainer(
        env="Signaling-v0", env_kwargs={"num_items": num_items, "rounds": rounds},
        policies={"speaker": Policy(lr=lr, seed=seed, sft_steps=sft_steps, sft_lr=3e-3,
                                    api="completions", critic=critic,
                                    sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "speaker"}, agents={"listener": listener},
        algorithm=algorithm, batch_size=batch_size,
        group_size=group_size if arm == "grpo" else 1, max_staleness=0, seed=seed,
        warm_start={"episodes": 64, "players": {"speaker": "random", "listener": listener}},
        eval_seeds=range(2_000_000, 2_000_000 + eval_seeds),
        run_dir=None if run_dir is None else Path(run_dir) / arm, progress=False)


async def run_arm(arm: str, steps: int, **build_kw: Any) -> dict[str, Any]:
    """Warm start, greedy eval, ``steps`` train steps, greedy eval; the curves and timings."""
    t0 = time.perf_counter()
    trainer = build(arm, **build_kw)
    try:
        await trainer.setup()
        before = await trainer.evaluate()
        t1 = time.perf_counter()
        history = await trainer.afit(steps)
        t2 = time.perf_counter()
        final = await trainer.evaluate()
    finally:
        await trainer.aclose()
    return {
        "arm": arm, "steps": steps, "episodes": steps * trainer.batch_size,
        "group_size": trainer.group_size,
        "reward": [h.get("train/speaker/reward", float("nan")) for h in history],
        "entropy": [h.get("policy/speaker/entropy", float("nan")) for h in history],
        "explained_variance": [h["critic/speaker/explained_variance"] for h in history
                               if "critic/speaker/explained_variance" in h],
        "eval_before": before.get("eval/speaker/success"),
        "eval_final": final.get("eval/speaker/success"),
        "seconds": {"setup_warm_start": t1 - t0, "train": t2 - t1},
    }


def summary_line(result: dict[str, Any], k: int = 5) -> str:
    """``arm: reward first-k mean -> last-k mean, greedy success, explained variance, time``."""
    r = result["reward"]
    first, last = sum(r[:k]) / len(r[:k]), sum(r[-k:]) / len(r[-k:])
    ev = result["explained_variance"]
    ev_text = f", critic EV {ev[0]:.2f} -> {sum(ev[-k:]) / len(ev[-k:]):.2f}" if ev else ""
    return (f"{result['arm']:10} group_size {result['group_size']}, {result['episodes']} episodes:"
            f" reward {first:.2f} -> {last:.2f} (first/last {k} steps), greedy success "
            f"{result['eval_before']:.2f} -> {result['eval_final']:.2f}{ev_text}; train {result['seconds']['train']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16, help="episodes per step, all arms")
    parser.add_argument("--group-size", type=int, default=4, help="GRPO's episodes per seed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--critic-lr", type=float, default=1e-3)
    parser.add_argument("--critic-updates", type=int, default=1,
                        help="critic optimizer steps per batch")
    parser.add_argument("--critic-warmup", type=int, default=0,
                        help="steps that train the critic alone before the policy updates")
    parser.add_argument("--entropy-coef", type=float, default=0.0)
    parser.add_argument("--kl-coef", type=float, default=0.0)
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--eval-seeds", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default="runs/ppo_critic_compare")
    args = parser.parse_args(argv)
    results = []
    for arm in args.arms.split(","):
        result = asyncio.run(run_arm(
            arm, args.steps, batch_size=args.batch_size, group_size=args.group_size,
            rounds=args.rounds, lr=args.lr, critic_lr=args.critic_lr,
            critic_updates=args.critic_updates, critic_warmup=args.critic_warmup,
            entropy_coef=args.entropy_coef, kl_coef=args.kl_coef, sft_steps=args.sft_steps,
            eval_seeds=args.eval_seeds, seed=args.seed, run_dir=args.run_dir))
        print(summary_line(result, k=min(5, args.steps)), flush=True)
        results.append(result)
    out = Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
