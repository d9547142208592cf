"""Every built-in env answers malformed actions with feedback or reward 0, never an exception."""

from __future__ import annotations

import itertools

import pytest

import areal_agents as aa
from areal_agents.messages import tool_call

ENV_IDS = [
    "Countdown-v0", "Arithmetic-v0", "GuessNumber-v0", "Calculator-v0", "Signaling-v0",
    "TicTacToe-v0", "PrisonersDilemma-v0", "Negotiation-v0", "SolverJudge-v0",
]  # fmt: skip
NASTY = [
    "",
    "   ",
    "9" * 5000,
    "Answer: " + "9" * 5000,
    "propose: " + "1" * 5000 + " 1 1",
    "Answer: " + "(" * 400 + "1",
    "Answer: 1/0",
    "Answer: 1e999",
    "\x00\u2603 accept? C D 0 -5 99999999999999999999",
    {"role": "assistant", "content": None, "tool_calls": [tool_call("calculator", "{bad")]},
    {"role": "assistant", "content": "", "tool_calls": [tool_call("rm", {"path": "/"})]},
    {"role": "assistant", "content": None, "tool_calls": [tool_call("calculator", "[" * 100000)]},
    {"role": "assistant", "content": None, "tool_calls": [tool_call("calculator", "1" * 5000)]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [tool_call("calculator", {"expression": 5})],
    },
]


@pytest.mark.parametrize("env_id", ENV_IDS)
async def test_nasty_actions_never_raise(env_id: str) -> None:
    env = aa.make(env_id)
    for seed, start in itertools.product(range(2), range(len(NASTY))):
        actions = itertools.cycle(NASTY[start:] + NASTY[:start])
        obs, _ = await env.reset(seed=seed)
        for _ in range(40):
            if isinstance(env, aa.MultiAgentEnv):
                obs, rewards, *_ = await env.step({a: next(actions) for a in obs})
                assert all(r <= 1.0 or env_id == "PrisonersDilemma-v0" for r in rewards.values())
                if not env.agents:
                    break
            else:
                obs, reward, terminated, truncated, _ = await env.step(next(actions))
                assert reward in (0.0,) and all(isinstance(m["content"], str) for m in obs)
                if terminated or truncated:
                    break
        else:
            pytest.fail(f"{env_id} did not end within 40 steps of bad actions")
