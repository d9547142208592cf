"""``benchmarks/async_vs_sync.py`` part (b): the generation-heavy workload's warm-start player."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

import areal_agents as aa

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "async_vs_sync.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("async_vs_sync", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_worked_answer_player_is_right_and_long(bench):
    env = aa.make("Arithmetic-v0", **bench.ARITHMETIC.env_kwargs)

    async def rewards_and_answers() -> list[tuple[float, str]]:
        out = []
        for seed in range(30):  # +, - and * all occur
            observation, _ = await env.reset(seed=seed)
            answer = bench.worked_answer(observation)
            out.append(((await env.step(answer))[1], answer))
        return out

    played = asyncio.run(rewards_and_answers())
    assert all(reward == 1.0 for reward, _ in played), played
    # 19-28 tiny-tokenizer tokens each (measured; the tokenizer takes seconds to build)
    assert min(len(answer) for _, answer in played) >= 30
    assert bench.worked_answer([{"role": "user", "content": "Compute.\n47 * 83 = ?"}]) == (
        "47 * 83 = 47 * 80 + 47 * 3 = 3760 + 141 = 3901\nAnswer: 3901")


def test_both_workloads_are_offered_and_signaling_stays_one_token(bench):
    assert sorted(bench.WORKLOADS) == ["arithmetic", "signaling"]
    assert bench.SIGNALING.max_tokens == 1
