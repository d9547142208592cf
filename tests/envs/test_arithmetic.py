"""Arithmetic-v0: rules, answer format, partial credit, seeding and error paths."""

from __future__ import annotations

import numpy as np
import pytest

import areal_agents as aa
from areal_agents.agents.players import arithmetic_solver
from areal_agents.envs.arithmetic import Arithmetic, make_task, parse_answer, score


def test_make_task_shapes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        question, answer = make_task(rng, digits=3, operations="+-*/")
        a, op, b = question.split()
        assert len(a) >= 3 and len(b) == 3
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}.get(op)
        assert answer == (expected if op != "/" else int(a) // int(b))
        if op == "/":
            assert int(a) % int(b) == 0 and 100 <= answer <= 999


def test_parse_answer_format() -> None:
    assert parse_answer("work...\nAnswer: -42") == -42
    assert parse_answer("Answer: 1\nAnswer: 7.") == 7
    assert parse_answer("answer:12") == 12
    assert parse_answer("The result is 42") is None
    assert parse_answer("Answer: 42 apples") is None
    assert parse_answer(None) is None


def test_score_exact_and_partial() -> None:
    assert score("Answer: 3901", 3901) == (1.0, "correct")
    assert score("Answer: 3900", 3901) == (0.0, "wrong (3900)")
    assert score("3901", 3901)[0] == 0.0
    assert score("Answer: 3900", 3901, partial_credit=True) == (
        0.375,
        "wrong (3900), 3/4 digits right",
    )
    assert score("Answer: 3901", 3901, partial_credit=True)[0] == 1.0
    assert score("nothing", 3901, partial_credit=True)[0] == 0.0


async def test_episode() -> None:
    env = aa.make("Arithmetic-v0", digits=3, partial_credit=True)
    obs, info = await env.reset(seed=1)
    assert obs[0]["content"].endswith(f"{info['question']} = ?")
    obs, reward, terminated, truncated, _ = await env.step(arithmetic_solver(obs))
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert obs[0]["content"] == "Correct."
    obs, _ = await env.reset(seed=1)
    obs, reward, *_ = await env.step({"role": "assistant", "content": "no idea"})
    assert reward == 0.0 and "no answer found" in obs[0]["content"]
    with pytest.raises(aa.ResetNeeded):
        await env.step("Answer: 1")


@pytest.mark.parametrize("ops", ["+", "-", "*", "/", "+-*/"])
async def test_solver_optimal(ops: str) -> None:
    env = Arithmetic(digits=2, operations=ops)
    for seed in range(5):
        obs, _ = await env.reset(seed=seed)
        assert (await env.step(arithmetic_solver(obs)))[1] == 1.0


async def test_seeding() -> None:
    env = Arithmetic()
    a, b, c = (await env.reset(seed=7)), (await env.reset(seed=7)), (await env.reset(seed=8))
    assert a == b and a != c
    assert parse_answer(env.sample_action()) is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"digits": 0}, "digits must be in 1..9"),
        ({"operations": "%"}, "operations must be"),
        ({"operations": ""}, "operations must be"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Arithmetic(**kwargs)
