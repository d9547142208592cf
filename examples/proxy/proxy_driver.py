"""What the proxy example agents share: their command line and the loop that plays questions.

Imported by the agents in this folder as a sibling module (they run as files:
``python examples/proxy/<agent>.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable

import httpx2
import openai

from areal_agents.proxy import SessionRefused


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every proxy agent takes (gateway, key, policy, group size, load, budget)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default=None, help="admin key (default $AREAL_AGENTS_ADMIN_KEY)")
    p.add_argument("--policy", default="solver")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=2, help="questions played at once")
    p.add_argument("--episodes", type=int, default=10_000)
    p.add_argument("--max-tokens", type=int, default=4)
    return p


async def play_questions(args: argparse.Namespace,
                         play: Callable[[argparse.Namespace, int], Awaitable[None]]) -> int:
    """Play question 0, 1, ... (``play(args, task)`` plays one as a group of
    ``args.group_size`` episodes), ``args.concurrency`` at a time, until ``args.episodes`` are
    done or the server goes away (printed as ``{"stopped": <error>}``). Returns 0."""
    next_task = done = 0

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
