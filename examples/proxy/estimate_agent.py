"""An external agent with a dense reward for ``serve --train``: one-digit additions in the
``Arithmetic-v0`` format (``Answer: <number>``), rewarded by how close the answer is,
``max(0, 1 - |answer - truth| / --width)`` (0 without an ``Answer:`` line).

The tiny model of ``examples/proxy/train_estimate.yaml`` starts from a format-only warm start
(SFT on ``Answer: <random number in [-10, 100)>``), so untrained answers are mostly far off;
the dense reward gives nearly every group a spread to learn from. Groups of 4 cycle through 8
fixed questions (``--questions``), so every weight version meets the same ones. One JSON
line per episode: ``{"task_id", "question", "reward", "versions", "reply"}``.
``--shuffle-rewards`` posts the true reward of another, randomly chosen earlier episode
instead (a control: training on it must not improve the policy). ``evaluate`` scores the
served policy on the fixed questions, greedily and unrecorded (admin key, no session).
Run, next to
``areal-agents serve --train examples/proxy/train_estimate.yaml``:

    python examples/proxy/estimate_agent.py --url http://127.0.0.1:8000 --key $ADMIN
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import openai
from proxy_driver import base_parser, play_questions

from areal_agents.envs.arithmetic import parse_answer, prompt
from areal_agents.proxy import episode


def reward_of(reply: str, truth: int, width: float) -> float:
    """``max(0, 1 - |answer - truth| / width)`` for the reply's ``Answer: <n>``, else 0."""
    answer = parse_answer(reply)
    return 0.0 if answer is None else max(0.0, 1.0 - abs(answer - truth) / width)


def question_of(task: int, num_questions: int) -> tuple[int, int]:
    """The operands of group ``task``: with ``num_questions`` > 0 the question
    ``task % num_questions`` of a fixed set (every weight version then meets the same
    questions, so per-version mean rewards compare like with like), else drawn with seed
    ``task``."""
    rng = random.Random(task % num_questions if num_questions else task)
    return rng.randrange(10), rng.randrange(10)


_PAST_REWARDS: list[float] = []  # --shuffle-rewards: rewards earned so far, to post at random


async def evaluate(url: str, key: str, policy: str = "solver", questions: int = 8,
                   width: float = 20.0, max_tokens: int = 6, samples: int = 0) -> float:
    """The mean reward of ``policy`` as served at ``url`` on the ``questions`` fixed questions
    (``question_of(k, questions)``, ``k < questions``): greedy (temperature 0) with
    ``samples`` 0, else the mean of ``samples`` replies per question at temperature 1. Asked
    through chat completions with the admin ``key`` and no session: nothing is recorded or
    trained."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key)

    async def ask(k: int, n: int) -> list[float]:
        a, b = question_of(k, questions)
        reply = await client.chat.completions.create(
            model=policy, messages=[{"role": "user", "content": prompt(f"{a} + {b}")}],
            max_tokens=max_tokens, temperature=1.0 if samples else 0.0, n=n)
        return [reward_of(c.message.content or "", a + b, width) for c in reply.choices]

    asks = [(k, min(8, samples - i)) for k in range(questions)  # the gateway's n is <= 8
            for i in range(0, samples, 8)] if samples else [(k, 1) for k in range(questions)]
    async with client:
        rewards = [r for rs in await asyncio.gather(*(ask(k, n) for k, n in asks)) for r in rs]
    return sum(rewards) / len(rewards)


async def play(args: argparse.Namespace, task: int) -> None:
    """Play question ``task`` ``args.group_size`` times at once (one group)."""
    a, b = question_of(task, args.questions)
    messages = [{"role": "user", "content": prompt(f"{a} + {b}")}]

    async def one() -> None:
        async with episode(args.url, args.policy, task_id=f"q{task}", role="solver",
                           key=args.key) as ep:
            reply = await ep.client.chat.completions.create(
                model=args.policy, messages=messages, max_tokens=args.max_tokens,
                temperature=1.0)
            text = reply.choices[0].message.content or ""
            reward = reward_of(text, a + b, args.width)
            posted = reward
            if args.shuffle_rewards:
                _PAST_REWARDS.append(reward)
                posted = random.choice(_PAST_REWARDS)
            await ep.reward(posted)
            versions = await ep.versions()
        print(json.dumps({"task_id": f"q{task}", "question": f"{a} + {b}", "reward": reward,
                          "versions": versions, "reply": text}), flush=True)

    await asyncio.gather(*(one() for _ in range(args.group_size)))


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=20.0, help="distance at which reward is 0")
    p.add_argument("--questions", type=int, default=8,
                   help="cycle through this many fixed questions (0: a new one per group)")
    p.add_argument("--shuffle-rewards", action="store_true",
                   help="post a random earlier episode's reward (a control that must not learn)")
    p.set_defaults(group_size=4, concurrency=8, max_tokens=6)
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(play_questions(parse_args(), play)))
