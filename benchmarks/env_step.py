"""Steps per second of ``run_episode`` with scripted agents, against a bare loop.

For Countdown the bare loop calls the env's own rule functions (``make_task``, ``prompt``,
``extract_answer``, ``check``) directly on the same episodes (same seeds, same answers, which
are computed before timing). The ratio ``bare / run_episode`` is the cost of the async API
(target: under 2x). Every other registered env is timed through ``run_episode`` with agents
that play the env's ``sample_action`` (or ``"0"``), for reference.

Run: ``python benchmarks/env_step.py [--episodes 2000] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

import areal_agents as aa
from areal_agents.agents.players import solve_countdown
from areal_agents.envs._expr import extract_answer
from areal_agents.envs.countdown import check, make_task, prompt
from areal_agents.errors import ConfigError


def countdown_answers(num_episodes: int, difficulty: str = "medium") -> list[str]:
    """The scripted answer of each episode (seed = episode index), computed up front."""
    answers = []
    for seed in range(num_episodes):
        numbers, target = make_task(np.random.default_rng(seed), difficulty)
        answers.append(f"Answer: {solve_countdown(numbers, target) or '0'}")
    return answers


def bare_countdown(answers: list[str], difficulty: str = "medium") -> float:
    """The same episodes through the rule functions only; returns the total reward."""
    total = 0.0
    for seed, answer in enumerate(answers):
        numbers, target = make_task(np.random.default_rng(seed), difficulty)
        _ = [{"role": "user", "content": prompt(numbers, target)}]
        correct, _reason = check(extract_answer(answer), numbers, target)
        total += float(correct)
    return total


async def api_countdown(answers: list[str], difficulty: str = "medium") -> float:
    """The same episodes through ``aa.make`` + ``run_episode`` with a scripted agent."""
    env = aa.make("Countdown-v0", difficulty=difficulty)
    total = 0.0
    for seed, answer in enumerate(answers):
        agent = aa.ScriptedAgent(lambda obs, answer=answer: answer)
        episode = await aa.run_episode(env, agent, seed=seed)
        total += episode.total_return
    return total


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


async def api_sampled(env_id: str, num_episodes: int) -> int:
    """Steps taken by ``run_episode`` on ``env_id`` with sample_action-playing agents."""
    env = aa.make(env_id)
    multi = isinstance(env, aa.MultiAgentEnv)
    sample = getattr(env, "sample_action", None)

    def agent(agent_id):
        return aa.ScriptedAgent(lambda obs: sample(agent_id) if sample else "0")

    agents = {a: agent(a) for a in env.possible_agents} if multi else agent(None)
    steps = 0
    for seed in range(num_episodes):
        steps += (await aa.run_episode(env, agents, seed=seed)).length
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    answers = countdown_answers(args.episodes)
    t_bare, r_bare = best_of(args.repeats, lambda: bare_countdown(answers))
    t_api, r_api = best_of(args.repeats, lambda: asyncio.run(api_countdown(answers)))
    assert r_bare == r_api, f"the two loops disagree: bare {r_bare} vs run_episode {r_api}"
    n = len(answers)  # one step per Countdown episode
    print(f"Countdown-v0 ({n} episodes, return {r_api:.0f}, best of {args.repeats}):")
    print(f"  bare loop (rule functions): {n / t_bare:10.0f} steps/s")
    print(f"  run_episode (async API):    {n / t_api:10.0f} steps/s")
    print(f"  ratio (API time / bare):    {t_api / t_bare:10.2f}x   (target < 2x)")

    print("\nrun_episode with sample_action agents, per env:")
    for env_id in sorted(aa.registry):
        try:
            aa.make(env_id)
        except ConfigError:  # e.g. Dataset-v0 cannot be built without a data file
            print(f"  {env_id:20s} skipped (needs env arguments)")
            continue
        episodes = max(20, args.episodes // 10)
        start = time.perf_counter()
        steps = asyncio.run(api_sampled(env_id, episodes))
        elapsed = time.perf_counter() - start
        print(
            f"  {env_id:20s} {steps / elapsed:10.0f} steps/s  ({steps} steps, {episodes} episodes)"
        )


if __name__ == "__main__":
    main()
