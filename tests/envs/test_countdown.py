"""Countdown-v0 and the safe expression parser: rules, rewards, seeding, error paths."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import areal_agents as aa
from areal_agents.agents.players import countdown_solver, solve_countdown
from areal_agents.envs._expr import ExprError, extract_answer, parse
from areal_agents.envs.countdown import LEVELS, Countdown, check, make_task


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", Fraction(7, 2)),
        ("-3 + 5", 2),
        ("2 - 3 - 4", -5),
        ("8 / 4 / 2", 1),
        ("2 × 3 ÷ 4", Fraction(3, 2)),
        ("--2", 2),
        ("1.5 * 2", 3),
    ],
)
def test_parse_values(text: str, value: Fraction) -> None:
    assert parse(text).value == value


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "empty"),
        ("1 +", "ends too early"),
        ("(1 + 2", "ends too early"),
        ("(1 + 2))", "after a complete"),
        ("1 / (2 - 2)", "division by zero"),
        ("__import__('os')", "unexpected character"),
        ("1 2", "after a complete"),
        ("9" * 300, "too long"),
    ],
)
def test_parse_errors(text: str, error: str) -> None:
    with pytest.raises(ExprError, match=error):
        parse(text)


def test_parse_records_numbers_in_order() -> None:
    assert parse("(10 - 3) * 3").numbers == (10, 3, 3)


def test_extract_answer() -> None:
    assert extract_answer("thinking...\nAnswer: (1+2)*3.") == "(1+2)*3"
    assert extract_answer("answer = 4\nAnswer: 5") == "5"
    assert extract_answer("no marker\n 2 + 2 ") == "2 + 2"
    assert extract_answer("") is None


def test_check_rules() -> None:
    assert check("3 * 7", [2, 3, 7], 21) == (True, "correct")
    assert check("3 * 7 * 1", [2, 3, 7], 21)[1].startswith("uses numbers not given")
    assert check("3 * 3 + 12", [3, 12, 7], 21)[1] == "uses numbers not given (or too often): [3]"
    assert check("3 + 7", [2, 3, 7], 21)[1] == "the expression equals 10, not 21"
    assert check("1.5 * 14", [2, 3, 7], 21)[1] == "only the given whole numbers may be used"
    assert not check(None, [2, 3, 7], 21)[0]
    assert check("7 / (3 - 3)", [3, 3, 7], 21)[1] == "invalid expression: division by zero"


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_tasks_are_solvable_and_sized(difficulty: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        numbers, target = make_task(rng, difficulty)  # type: ignore[arg-type]
        count, largest, _ = LEVELS[difficulty]
        assert len(numbers) == count and all(1 <= n <= largest for n in numbers)
        expr = solve_countdown(numbers, target)
        assert expr is not None and check(expr, numbers, target)[0]


async def test_episode_rewards_and_feedback() -> None:
    env = Countdown(difficulty="easy")
    obs, info = await env.reset(seed=3)
    assert len(obs) == 1 and obs[0]["role"] == "user"
    assert obs[0]["content"].endswith(f"Target: {info['target']}")
    obs, reward, terminated, truncated, step_info = await env.step(countdown_solver(obs))
    assert (reward, terminated, truncated) == (1.0, True, False) and step_info["correct"]
    assert obs == [{"role": "user", "content": "Correct."}]
    await env.reset(seed=3)
    obs, reward, *_ = await env.step({"role": "assistant", "content": "I don't know"})
    assert reward == 0.0 and obs[0]["content"].startswith("Wrong: invalid expression")
    with pytest.raises(aa.ResetNeeded):
        await env.step("Answer: 1")


async def test_seeding_is_deterministic_and_varies() -> None:
    env = Countdown()
    first = [await env.reset(seed=s) for s in (0, 0, 1)]
    assert first[0] == first[1] and first[0] != first[2]
    a, b = Countdown(), Countdown()
    await a.reset(seed=5)
    await b.reset(seed=5)
    assert [a.sample_action() for _ in range(3)] == [b.sample_action() for _ in range(3)]


async def test_solver_is_optimal_on_many_seeds() -> None:
    env = aa.make("Countdown-v0", difficulty="hard")
    total = 0.0
    for seed in range(8):
        obs, _ = await env.reset(seed=seed)
        total += (await env.step(countdown_solver(obs)))[1]
    assert total == 8.0


async def test_sample_action_is_parseable() -> None:
    env = Countdown()
    await env.reset(seed=0)
    for _ in range(10):
        assert extract_answer(env.sample_action()) is not None
    await env.close()
    await env.close()


def test_bad_difficulty() -> None:
    with pytest.raises(ValueError, match="difficulty must be one of"):
        Countdown(difficulty="impossible")  # type: ignore[arg-type]
