"""Calculator-v0: tool schema, tool results, malformed tool calls, answers, turn budget."""

from __future__ import annotations

import json

import pytest

import areal_agents as aa
from areal_agents.agents.players import calculator_player
from areal_agents.envs.calculator import CALCULATOR_TOOL, Calculator, run_tool_call
from areal_agents.messages import tool_call


def _call(name: str, arguments: dict | str, call_id: str = "c1") -> dict:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [tool_call(name, arguments, call_id)],
    }


def test_tool_schema() -> None:
    env = Calculator()
    assert env.tools == [CALCULATOR_TOOL]
    fn = env.tools[0]["function"]
    assert fn["name"] == "calculator" and fn["parameters"]["required"] == ["expression"]


@pytest.mark.parametrize(
    ("name", "arguments", "result"),
    [
        ("calculator", {"expression": "12 * (3 + 4)"}, "84"),
        ("calculator", {"expression": "7 / 2"}, "7/2"),
        ("calculator", {"expression": "1 / 0"}, "error: division by zero"),
        ("calculator", "{not json", "error: arguments are not valid JSON"),
        ("calculator", {"expr": "1"}, "error: missing string argument 'expression'"),
        ("calculator", "[1, 2]", "error: missing string argument"),
        ("search", {"q": "x"}, "error: unknown tool 'search'"),
    ],
)
def test_run_tool_call(name: str, arguments: dict | str, result: str) -> None:
    assert run_tool_call(tool_call(name, arguments)).startswith(result)


async def test_tool_round_trip_and_answer() -> None:
    env = aa.make("Calculator-v0")
    obs, info = await env.reset(seed=0)
    assert obs[0]["content"].endswith(f"What is {info['question']}?")
    obs, reward, terminated, _, _ = await env.step(
        _call("calculator", {"expression": info["question"]}, "abc")
    )
    assert (reward, terminated) == (0.0, False)
    assert obs == [
        {
            "role": "tool",
            "content": str(info["answer"]),
            "tool_call_id": "abc",
            "name": "calculator",
        }
    ]
    obs, reward, terminated, _, _ = await env.step(f"Answer: {info['answer']}")
    assert (reward, terminated) == (1.0, True)


async def test_bad_tool_calls_are_observations_not_crashes() -> None:
    env = Calculator(max_turns=5)
    await env.reset(seed=1)
    two = {
        "role": "assistant",
        "content": "",
        "tool_calls": [tool_call("nope", {}, "a"), tool_call("calculator", "{", "b")],
    }
    obs, reward, terminated, _, info = await env.step(two)
    assert [m["tool_call_id"] for m in obs] == ["a", "b"] and info["tool_calls"] == 2
    assert all(m["role"] == "tool" and m["content"].startswith("error:") for m in obs)
    assert (reward, terminated) == (0.0, False)


async def test_wrong_answer_and_turn_budget() -> None:
    env = Calculator(max_turns=2)
    _, info = await env.reset(seed=2)
    obs, reward, terminated, *_ = await env.step("Answer: 1")
    assert (reward, terminated) == (0.0, True) and obs[0][
        "content"
    ] == f"Wrong: the answer is {info['answer']}."
    await env.reset(seed=2)
    await env.step(_call("calculator", {"expression": "1"}))
    obs, reward, terminated, *_ = await env.step(_call("calculator", {"expression": "2"}))
    assert (reward, terminated) == (0.0, True) and obs[-1]["content"] == "Out of turns."
    with pytest.raises(aa.ResetNeeded):
        await env.step("Answer: 1")


async def test_player_is_optimal() -> None:
    env = Calculator(digits=5, terms=4)
    for seed in range(6):
        obs, _ = await env.reset(seed=seed)
        terminated, reward = False, 0.0
        while not terminated:
            obs, reward, terminated, _, _ = await env.step(calculator_player(obs))
        assert reward == 1.0


async def test_seeding_and_sample_action() -> None:
    env = Calculator()
    a, b, c = (await env.reset(seed=9)), (await env.reset(seed=9)), (await env.reset(seed=10))
    assert a == b and a != c
    assert env.sample_action().startswith("Answer: ")
    assert json.loads(calculator_player(a[0])["tool_calls"][0]["function"]["arguments"]) == {
        "expression": a[1]["question"]
    }


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="terms >= 2"):
        Calculator(terms=1)
