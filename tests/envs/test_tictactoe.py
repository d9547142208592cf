"""TicTacToe-v0: turns, wins, draws, illegal moves (penalty and re-ask), seeding, misuse."""

from __future__ import annotations

import random

import pytest

import areal_agents as aa
from areal_agents.agents.players import tictactoe_minimax
from areal_agents.envs.tictactoe import TicTacToe, render, winner


async def _play(env: TicTacToe, players: dict, seed: int = 0) -> dict[str, float]:
    obs, _ = await env.reset(seed=seed)
    returns = dict.fromkeys(env.possible_agents, 0.0)
    while env.agents:
        obs, rewards, *_ = await env.step({a: players[a](o) for a, o in obs.items()})
        for agent, r in rewards.items():
            returns[agent] += r
    return returns


def test_rules_helpers() -> None:
    assert winner("XXX......") == "X" and winner("O...O...O") == "O" and winner("XOXXOOOXX") is None
    assert render("XO.......") == "XO.\n...\n..."
    assert TicTacToe.parse_move("I play 5") == 4 and TicTacToe.parse_move("cell 10") is None
    assert TicTacToe.parse_move("not 1 but 9") == 8 and TicTacToe.parse_move(None) is None


async def test_win_and_observations() -> None:
    env = TicTacToe()
    obs, _ = await env.reset(seed=0)
    assert list(obs) == ["x"] and obs["x"][0]["content"].endswith(
        "You are X. Board:\n...\n...\n..."
    )
    moves = [("x", "1"), ("o", "4"), ("x", "2"), ("o", "5")]
    for agent, move in moves:
        obs, rewards, terms, _, _ = await env.step({agent: move})
        assert rewards == {"x": 0.0, "o": 0.0} and not any(terms.values())
    assert (
        list(obs) == ["x"]
        and obs["x"][0]["content"] == "Opponent played 5. You are X. Board:\nXX.\nOO.\n..."
    )
    obs, rewards, terms, _truncs, infos = await env.step({"x": "3"})
    assert obs == {} and rewards == {"x": 1.0, "o": -1.0} and terms == {"x": True, "o": True}
    assert infos["o"]["winner"] == "x" and env.agents == []
    with pytest.raises(aa.ResetNeeded):
        await env.step({"o": "6"})


async def test_draw() -> None:
    env = TicTacToe()
    script = iter(["1", "2", "3", "5", "4", "6", "8", "7", "9"])
    returns = await _play(env, {"x": lambda o: next(script), "o": lambda o: next(script)})
    assert returns == {"x": 0.0, "o": 0.0} and env.board == "XOXXOOOXX"


async def test_illegal_move_penalty_ends_game() -> None:
    env = TicTacToe()
    await env.reset(seed=0)
    await env.step({"x": "5"})
    obs, rewards, _terms, _, infos = await env.step({"o": "5"})
    assert (
        obs == {}
        and rewards == {"o": -1.0, "x": 0.0}
        and infos["x"]["illegal"] == "cell 5 is taken"
    )
    await env.reset(seed=0)
    _, rewards, *_ = await env.step({"x": "hmm"})
    assert rewards == {"x": -1.0, "o": 0.0}


async def test_illegal_move_reask() -> None:
    env = TicTacToe(illegal="reask", max_reasks=2)
    await env.reset(seed=0)
    obs, rewards, terms, *_ = await env.step({"x": "zero"})
    assert list(obs) == ["x"] and rewards == {"x": 0.0, "o": 0.0} and not terms["x"]
    assert obs["x"][0]["content"].startswith("Illegal move: no cell number 1-9. Try again.")
    obs, *_ = await env.step({"x": "5"})
    assert list(obs) == ["o"]
    await env.step({"o": "5"})
    await env.step({"o": "5"})
    obs, rewards, *_ = await env.step({"o": "5"})
    assert obs == {} and rewards == {"o": -1.0, "x": 0.0}


async def test_minimax_never_loses() -> None:
    env = TicTacToe()
    assert await _play(env, {"x": tictactoe_minimax, "o": tictactoe_minimax}) == {
        "x": 0.0,
        "o": 0.0,
    }
    for seed in range(10):
        rng = random.Random(seed)

        def rand(obs: list, rng: random.Random = rng) -> str:
            return rng.choice([str(i + 1) for i, c in enumerate(env.board) if c == "."])

        assert (await _play(env, {"x": tictactoe_minimax, "o": rand}))["x"] >= 0.0
        assert (await _play(env, {"x": rand, "o": tictactoe_minimax}))["o"] >= 0.0
    wins = [
        (await _play(env, {"x": tictactoe_minimax, "o": lambda o: env.sample_action("o")}, s))["x"]
        for s in range(5)
    ]
    assert sum(wins) >= 3


async def test_minimax_takes_a_win_and_blocks() -> None:
    assert tictactoe_minimax("You are X. Board:\nXX.\nOO.\n...") == "3"
    assert tictactoe_minimax("You are O. Board:\nXX.\nO..\n...") == "3"


async def test_sample_action_is_legal_and_seeded() -> None:
    env = aa.make("TicTacToe-v0")
    await env.reset(seed=1)
    await env.step({"x": "5"})
    assert env.unwrapped.sample_action("o") != "5"
    assert env.unwrapped.render() == "...\n.X.\n..."


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="illegal must be"):
        TicTacToe(illegal="ignore")  # type: ignore[arg-type]
