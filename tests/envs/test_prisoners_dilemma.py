"""PrisonersDilemma-v0: simultaneous moves, payoffs, invalid moves, rounds, seeding, misuse."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.agents.players import pd_always_cooperate, pd_always_defect, pd_tit_for_tat
from areal_agents.envs.prisoners_dilemma import PrisonersDilemma, parse_move


async def _play(env: PrisonersDilemma, p0, p1, seed: int = 0) -> dict[str, float]:
    players = {"player_0": p0, "player_1": p1}
    obs, _ = await env.reset(seed=seed)
    returns = dict.fromkeys(env.possible_agents, 0.0)
    while env.agents:
        assert set(obs) == {"player_0", "player_1"}  # simultaneous: both act every step
        obs, rewards, *_ = await env.step({a: players[a](o) for a, o in obs.items()})
        for agent, r in rewards.items():
            returns[agent] += r
    return returns


def test_parse_move() -> None:
    assert parse_move("C") == "C" and parse_move("I will defect") == "D"
    assert parse_move("cooperate? no: D") == "D" and parse_move("d") == "D"
    assert parse_move("Cooperation") is None and parse_move("") is None


async def test_payoffs_per_round() -> None:
    env = PrisonersDilemma(rounds=4)
    obs, _ = await env.reset(seed=0)
    assert set(obs) == {"player_0", "player_1"} and obs["player_0"][0]["content"].endswith(
        "Round 1 of 4."
    )
    expected = [("C", "C", 3, 3), ("C", "D", 0, 5), ("D", "C", 5, 0), ("D", "D", 1, 1)]
    for i, (a, b, ra, rb) in enumerate(expected):
        obs, rewards, terms, _truncs, infos = await env.step({"player_0": a, "player_1": b})
        assert rewards == {"player_0": ra, "player_1": rb}
        assert infos["player_1"]["moves"] == {"player_0": a, "player_1": b}
        if i < 3:
            assert (
                obs["player_0"][0]["content"]
                == f"Round {i + 2} of 4. You got {ra}. Other's last move: {b}"
            )
    assert obs == {} and env.agents == [] and terms == {"player_0": True, "player_1": True}
    with pytest.raises(aa.ResetNeeded):
        await env.step({"player_0": "C", "player_1": "C"})


async def test_invalid_move_scores_zero_and_counts_as_c() -> None:
    env = PrisonersDilemma(rounds=2)
    await env.reset(seed=0)
    obs, rewards, *_ = await env.step({"player_0": "hmm", "player_1": "D"})
    assert rewards == {"player_0": 0.0, "player_1": 5.0}
    assert obs["player_1"][0]["content"].endswith("Other's last move: none")


async def test_simultaneous_step_needs_both_actions() -> None:
    env = PrisonersDilemma()
    await env.reset(seed=0)
    with pytest.raises(aa.MissingAction):
        await env.step({"player_0": "C"})
    with pytest.raises(aa.UnknownAgent):
        await env.step({"player_0": "C", "player_1": "C", "player_2": "C"})


async def test_strategies() -> None:
    env = aa.make("PrisonersDilemma-v0", rounds=10)
    assert await _play(env, pd_tit_for_tat, pd_tit_for_tat) == {"player_0": 30.0, "player_1": 30.0}
    assert await _play(env, pd_tit_for_tat, pd_always_defect) == {"player_0": 9.0, "player_1": 14.0}
    assert await _play(env, pd_always_defect, pd_always_cooperate) == {
        "player_0": 50.0,
        "player_1": 0.0,
    }


async def test_custom_payoffs_and_validation() -> None:
    env = PrisonersDilemma(
        rounds=1, payoffs={"CC": [2, 2], "CD": [-1, 4], "DC": [4, -1], "DD": [0, 0]}
    )
    await env.reset(seed=0)
    _, rewards, *_ = await env.step({"player_0": "cooperate", "player_1": "defect"})
    assert rewards == {"player_0": -1.0, "player_1": 4.0}
    with pytest.raises(ValueError, match="keys CC, CD, DC, DD"):
        PrisonersDilemma(payoffs={"CC": (1, 1)})
    with pytest.raises(ValueError, match="symmetric"):
        PrisonersDilemma(payoffs={"CC": (3, 3), "CD": (0, 5), "DC": (4, 0), "DD": (1, 1)})
    with pytest.raises(ValueError, match="rounds"):
        PrisonersDilemma(rounds=0)


async def test_seeding_and_sample_action() -> None:
    a, b = PrisonersDilemma(), PrisonersDilemma()
    assert (await a.reset(seed=3)) == (await b.reset(seed=3))
    assert [a.sample_action("player_0") for _ in range(8)] == [
        b.sample_action("player_0") for _ in range(8)
    ]
    assert {a.sample_action("player_1") for _ in range(30)} == {"C", "D"}
