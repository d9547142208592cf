"""An external agent with a dense reward for ``serve --train``: one-digit additions in the
``Arithmetic-v0`` format (``Answer: <number>``), rewarded by how close the answer is,
``max(0, 1 - |answer - truth| / --width)`` (0 without an ``Answer:`` line).

The tiny model of ``examples/proxy/train_estimate.yaml`` starts from a format-only warm start
(SFT on ``Answer: <random number in [-10, 100)>``), so untrained answers are mostly far off;
the dense reward gives nearly every group a spread to learn from. Groups of 4 cycle through 8
fixed questions (``--questions``), so every weight version meets the same ones. One JSON
line per episode: ``{"task_id", "question", "reward", "versions", "reply"}``. Run, next to
``areal-agents serve --train examples/proxy/train_estimate.yaml``:

    python examples/proxy/estimate_agent.py --url http://127.0.0.1:8000 --key $ADMIN
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

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
            await ep.reward(reward)
            versions = await ep.versions()
        print(json.dumps({"task_id": f"q{task}", "question": f"{a} + {b}", "reward": reward,
                          "versions": versions, "reply": text}), flush=True)

    await asyncio.gather(*(one() for _ in range(args.group_size)))


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=20.0, help="distance at which reward is 0")
    p.add_argument("--questions", type=int, default=8,
                   help="cycle through this many fixed questions (0: a new one per group)")
    p.set_defaults(group_size=4, concurrency=8, max_tokens=6)
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(play_questions(parse_args(), play)))
