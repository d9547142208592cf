"""The scripted players through ``run_episode`` + ``ScriptedAgent`` on every built-in env."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.agents import players as p


def _agents(env_id: str) -> dict[str, aa.Agent] | aa.Agent:
    table = {
        "Countdown-v0": p.countdown_solver,
        "Arithmetic-v0": p.arithmetic_solver,
        "GuessNumber-v0": p.GuessNumberBisect(),
        "Calculator-v0": p.calculator_player,
        "Signaling-v0": {"speaker": p.signaling_speaker, "listener": p.signaling_listener},
        "TicTacToe-v0": {"x": p.tictactoe_minimax, "o": p.tictactoe_minimax},
        "PrisonersDilemma-v0": {"player_0": p.pd_tit_for_tat, "player_1": p.pd_tit_for_tat},
        "Negotiation-v0": {"alice": p.NegotiationFair(), "bob": p.NegotiationFair()},
        "SolverJudge-v0": {"solver": p.solver_judge_solver, "judge": p.solver_judge_judge},
    }[env_id]
    if isinstance(table, dict):
        return {a: aa.ScriptedAgent(fn) for a, fn in table.items()}
    return aa.ScriptedAgent(table)


# the best joint return each scripted team reaches (Negotiation: at least this much)
BEST = {
    "Countdown-v0": {"agent": 1.0},
    "Arithmetic-v0": {"agent": 1.0},
    "GuessNumber-v0": {"agent": 1.0},
    "Calculator-v0": {"agent": 1.0},
    "Signaling-v0": {"speaker": 1.0, "listener": 1.0},
    "TicTacToe-v0": {"x": 0.0, "o": 0.0},
    "PrisonersDilemma-v0": {"player_0": 15.0, "player_1": 15.0},
    "SolverJudge-v0": {"solver": 1.0, "judge": 1.0},
}


@pytest.mark.parametrize("env_id", sorted(BEST))
async def test_scripted_players_reach_the_optimum(env_id: str) -> None:
    env = aa.make(env_id)
    for seed in range(3):
        episode = await aa.run_episode(env, _agents(env_id), seed=seed, raise_errors=True)
        assert episode.status == "terminated"
        assert episode.returns == BEST[env_id]


async def test_negotiation_players_make_deals() -> None:
    env = aa.make("Negotiation-v0")
    for seed in range(3):
        episode = await aa.run_episode(env, _agents("Negotiation-v0"), seed=seed, raise_errors=True)
        assert episode.infos["alice"]["deal"] and episode.total_return >= 0.8


def test_player_on_garbage_text_still_answers() -> None:
    assert p.countdown_solver("nothing") == "Answer: 0"
    assert p.arithmetic_solver("nothing") == "Answer: 0"
    assert p.tictactoe_minimax("nothing") == "1"  # empty board: a corner
    assert p.signaling_speaker("nothing") == "0" and p.signaling_listener("nothing") == "A"
    assert p.pd_tit_for_tat([]) == "C"
    assert p.solver_judge_judge("nothing") == "incorrect"


async def test_fixed_opponent_seats_turn_games_into_single_agent_envs() -> None:
    ttt = aa.FixedOpponents(
        aa.make("TicTacToe-v0"), learner="o", opponents={"x": aa.ScriptedAgent(p.tictactoe_minimax)}
    )
    episode = await aa.run_episode(ttt, aa.ScriptedAgent(p.tictactoe_minimax), seed=0)
    assert episode.status == "terminated" and episode.returns == {"agent": 0.0}
    speaker = aa.FixedOpponents(
        aa.make("Signaling-v0", rounds=3),
        learner="speaker",
        opponents={"listener": aa.ScriptedAgent(p.signaling_listener)},
    )
    episode = await aa.run_episode(speaker, aa.ScriptedAgent(p.signaling_speaker), seed=1)
    assert episode.returns == {"agent": 3.0} and episode.length == 3
    pd = aa.FixedOpponents(
        aa.make("PrisonersDilemma-v0"),
        learner="player_1",
        opponents={"player_0": aa.ScriptedAgent(p.pd_tit_for_tat)},
    )
    episode = await aa.run_episode(pd, aa.ScriptedAgent(p.pd_always_defect), seed=0)
    assert episode.returns == {"agent": 5.0 + 4 * 1.0}
