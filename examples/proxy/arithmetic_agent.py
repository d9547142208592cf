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

import httpx2
import openai

from areal_agents.proxy import SessionRefused, episode


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
    next_task = 0
    done = 0

    async def worker() -> None:
        nonlocal next_task, done
        while done < args.episodes:
            task, next_task = next_task, next_task + 1
            await play(args, task)
            done += args.group_size

    workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    try:
        await asyncio.gather(*workers)
    except (httpx2.TransportError, openai.APIConnectionError, SessionRefused) as exc:
        print(json.dumps({"stopped": type(exc).__name__}), flush=True)  # the server went away
    finally:
        for w in workers:
            w.cancel()
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default=None, help="admin key (default $AREAL_AGENTS_ADMIN_KEY)")
    p.add_argument("--policy", default="solver")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=2, help="questions played at once")
    p.add_argument("--episodes", type=int, default=10_000)
    p.add_argument("--max-tokens", type=int, default=4)
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
