"""GuessNumber-v0: feedback, guess budget, rewards, seeding and error paths."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.agents.players import GuessNumberBisect
from areal_agents.envs.guess_number import GuessNumber


async def test_feedback_sequence() -> None:
    env = GuessNumber(low=1, high=10, max_guesses=5)
    obs, info = await env.reset(seed=0)
    secret = info["secret"]
    assert obs[0]["content"].endswith("Guesses left: 5")
    low_guess = "0" if secret == 1 else "1"
    obs, reward, terminated, _, _ = await env.step(f"I guess {low_guess}")
    assert reward == 0.0 and not terminated
    assert obs[0]["content"] in (
        "Higher. Guesses left: 4",
        "0 is out of range: the number is from 1 to 10. Guesses left: 4",
    )
    obs, reward, terminated, _, step_info = await env.step(f"maybe 3, no: {secret}")
    assert (reward, terminated, step_info["guess"]) == (1.0, True, secret)
    assert obs[0]["content"] == f"Correct! It was {secret}."


async def test_lower_and_running_out() -> None:
    env = GuessNumber(low=1, high=100, max_guesses=2)
    _, info = await env.reset(seed=1)
    wrong = 100 if info["secret"] != 100 else 99
    obs, *_ = await env.step(str(wrong))
    assert obs[0]["content"] == "Lower. Guesses left: 1"
    obs, reward, terminated, truncated, _ = await env.step("no number here")
    assert (reward, terminated, truncated) == (0.0, True, False)
    assert (
        obs[0]["content"]
        == f"Reply with one whole number from 1 to 100. No guesses left; it was {info['secret']}."
    )
    with pytest.raises(aa.ResetNeeded):
        await env.step("5")


@pytest.mark.parametrize(("low", "high"), [(1, 100), (1, 1), (-5, 5), (0, 1000)])
async def test_bisection_always_wins_within_default_budget(low: int, high: int) -> None:
    env = GuessNumber(low=low, high=high)
    player = GuessNumberBisect()
    for seed in range(12):
        obs, _ = await env.reset(seed=seed)
        terminated, reward = False, 0.0
        while not terminated:
            obs, reward, terminated, _, _ = await env.step(player(obs))
        assert reward == 1.0


async def test_seeding_and_sampling() -> None:
    env = aa.make("GuessNumber-v0")
    secrets = [(await env.reset(seed=s))[1]["secret"] for s in (3, 3, 4, 5, 6)]
    assert secrets[0] == secrets[1] and len(set(secrets)) > 1
    assert 1 <= int(env.unwrapped.sample_action()) <= 100


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"low": 5, "high": 1}, "high must be"), ({"max_guesses": 0}, "max_guesses")],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GuessNumber(**kwargs)
