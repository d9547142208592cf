"""What the proxy example agents share: their command line and the loop that plays questions.

Imported by the agents in this folder as a sibling module (they run as files:
``python examples/proxy/<agent>.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType

import httpx2
import openai

from areal_agents.proxy import SessionRefused

REPO_ROOT = Path(__file__).resolve().parents[2]


def agents_sdk() -> ModuleType:
    """The OpenAI Agents SDK's ``agents`` package, also when this repository's root is on
    ``sys.path`` (``python -m`` or ``PYTHONPATH=.`` from the root): its ``agents/`` folder (the
    package ``areal_agents.agents``) would shadow the SDK. The root is left out of the path
    for this one import (the SDK's submodules then load from the SDK's own folder).

    Raises:
        SystemExit: the SDK is not installed (names the extra to install).
    """
    found = sys.modules.get("agents")
    if found is not None and hasattr(found, "Runner"):
        return found
    sys.modules.pop("agents", None)  # the repository's folder, if it was imported as such
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]
    try:
        module = importlib.import_module("agents")
    except ModuleNotFoundError:
        raise SystemExit("this agent needs OpenAI's Agents SDK: pip install "
                         "'areal-agents[agents_sdk]' (or openai-agents)") from None
    finally:
        sys.path[:] = saved
    if not hasattr(module, "Runner"):
        raise SystemExit(f"`import agents` found {module.__file__}, not OpenAI's Agents SDK; "
                         "pip install 'areal-agents[agents_sdk]'")
    return module


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
