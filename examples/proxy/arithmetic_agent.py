"""An external agent for ``areal-agents serve --train``: the official ``openai`` SDK through
``areal_agents.proxy.episode``, one-digit additions, the reward computed here (client side).

Each question is a task id played ``--group-size`` times (the group its advantages are
relative to). It plays until ``--episodes`` are done or the server goes away, and prints one
JSON line per episode: ``{"task_id", "reward", "versions"}`` (the weight versions of the
session's tokens). Run, next to ``areal-agents serve --train examples/proxy/train.yaml``:

    python examples/proxy/arithmetic_agent.py --url http://127.0.0.1:8000 --key $ADMIN
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

from proxy_driver import base_parser, play_questions

from areal_agents.proxy import episode


def reward_of(reply: str, answer: int) -> float:
    """1 for the right number; else a small credit for replying with digits only."""
    text = reply.strip()
    if text == str(answer):
        return 1.0
    return 0.25 * sum(ch.isdigit() for ch in text) / max(1, len(text))


async def play(args: argparse.Namespace, task: int) -> None:
    rng = random.Random(task)
    a, b = rng.randrange(10), rng.randrange(10)
    messages = [{"role": "user", "content": f"{a} + {b} ="}]

    async def one() -> None:
        async with episode(args.url, args.policy, task_id=f"q{task}", role="solver",
                           key=args.key) as ep:
            reply = await ep.client.chat.completions.create(
                model=args.policy, messages=messages, max_tokens=args.max_tokens,
                temperature=1.0)
            reward = reward_of(reply.choices[0].message.content or "", a + b)
            await ep.reward(reward)
            versions = await ep.versions()
        print(json.dumps({"task_id": f"q{task}", "reward": reward, "versions": versions}),
              flush=True)

    await asyncio.gather(*(one() for _ in range(args.group_size)))


async def main(args: argparse.Namespace) -> int:
    return await play_questions(args, play)


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
