"""SolverJudge-v0: turn order, verdict parsing, solver/judge rewards, both tasks, seeding."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.agents.players import (
    solver_judge_judge,
    solver_judge_lenient,
    solver_judge_solver,
)
from areal_agents.envs.solver_judge import SolverJudge, parse_verdict


async def _play(env: SolverJudge, solver, judge, seed: int) -> tuple[dict[str, float], dict]:
    players = {"solver": solver, "judge": judge}
    obs, _ = await env.reset(seed=seed)
    returns = dict.fromkeys(env.possible_agents, 0.0)
    while env.agents:
        obs, rewards, _, _, infos = await env.step({a: players[a](o) for a, o in obs.items()})
        for a, r in rewards.items():
            returns[a] += r
    return returns, infos


def test_parse_verdict() -> None:
    assert parse_verdict("Verdict: correct") == "correct"
    assert parse_verdict("Not correct. Final: Incorrect") == "incorrect"
    assert parse_verdict("looks fine") is None


async def test_turns_and_prompts() -> None:
    env = SolverJudge(task="arithmetic", digits=2)
    obs, infos = await env.reset(seed=0)
    assert list(obs) == ["solver"] and obs["solver"][0]["content"].endswith(f"{env.question} = ?")
    obs, rewards, terms, _, _ = await env.step({"solver": "Answer: 5"})
    assert (
        list(obs) == ["judge"]
        and rewards == {"solver": 0.0, "judge": 0.0}
        and not any(terms.values())
    )
    assert obs["judge"][0]["content"] == (
        f"Judge the solver's answer. Reply 'correct' or 'incorrect'.\nTask: {env.question} = ?\nSolver: Answer: 5"
    )
    obs, rewards, terms, _, infos = await env.step({"judge": "correct"})
    assert obs == {} and env.agents == [] and terms == {"solver": True, "judge": True}
    truth = env.answer == 5
    assert (
        rewards == {"solver": 1.0, "judge": float(truth)}
        and infos["judge"]["solver_correct"] is truth
    )
    with pytest.raises(aa.ResetNeeded):
        await env.step({"solver": "x"})


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
async def test_rewards_matrix(task: str) -> None:
    env = SolverJudge(task=task)  # type: ignore[arg-type]
    returns, infos = await _play(env, solver_judge_solver, solver_judge_judge, seed=1)
    assert returns == {"solver": 1.0, "judge": 1.0} and infos["judge"]["solver_correct"]
    returns, infos = await _play(env, lambda o: "Answer: 100000", solver_judge_judge, seed=1)
    assert returns == {"solver": 0.0, "judge": 1.0} and not infos["judge"]["solver_correct"]
    returns, _ = await _play(env, lambda o: "Answer: 100000", solver_judge_lenient, seed=1)
    assert returns == {"solver": 1.0, "judge": 0.0}  # a fooled judge pays, the solver gains
    returns, _ = await _play(env, solver_judge_solver, lambda o: "no idea", seed=1)
    assert returns == {"solver": 0.0, "judge": 0.0}


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
async def test_exact_judge_is_always_right(task: str) -> None:
    env = aa.make("SolverJudge-v0", task=task)
    for seed in range(8):
        solver = (
            solver_judge_solver
            if seed % 2
            else (lambda o, s=seed: env.unwrapped.sample_action("solver"))
        )
        returns, _ = await _play(env.unwrapped, solver, solver_judge_judge, seed)
        assert returns["judge"] == 1.0


async def test_seeding_and_options() -> None:
    env = SolverJudge(task="countdown")
    a, b = (await env.reset(seed=2)), (await env.reset(seed=2))
    assert a == b and a[1]["judge"]["task"].startswith("Numbers: ")
    assert env.sample_action("judge") in ("correct", "incorrect")
    with pytest.raises(ValueError, match="task must be"):
        SolverJudge(task="chess")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="digits"):
        SolverJudge(digits=0)


@pytest.mark.parametrize("weight", [0.0, 0.5])
async def test_several_judge_verdicts_on_one_answer(weight: float) -> None:
    env = SolverJudge(digits=1, operations="+-", truth_weight=weight, judge_samples=3)
    assert env.possible_agents == ["solver", "judge", "judge_1", "judge_2"]
    obs, infos = await env.reset(seed=4)
    assert list(obs) == ["solver"] and set(infos) == set(env.possible_agents)
    obs, rewards, _, _, _ = await env.step({"solver": f"Answer: {env.answer}"})  # right
    assert list(obs) == ["judge", "judge_1", "judge_2"]
    assert len({o[0]["content"] for o in obs.values()}) == 1  # the same prompt K times
    assert rewards == dict.fromkeys(env.possible_agents, 0.0)
    with pytest.raises(aa.MissingAction, match="judge_2"):
        await env.step({"judge": "correct", "judge_1": "correct"})
    obs, rewards, terms, _, infos = await env.step(
        {"judge": "correct", "judge_1": "Incorrect.", "judge_2": "no idea"})
    assert obs == {} and env.agents == [] and all(terms.values())
    # each verdict its own agreement reward; the solver paid by the mean verdict (1 of 3)
    assert rewards == {"solver": pytest.approx((1 - weight) / 3 + weight),
                       "judge": 1.0, "judge_1": 0.0, "judge_2": 0.0}
    assert [infos[j]["verdict"] for j in ("judge", "judge_1", "judge_2")] == [
        "correct", "incorrect", None]
    assert [infos[j]["success"] for j in ("judge", "judge_1", "judge_2")] == [True, False, False]
    assert infos["solver"] == {"verdict": "correct", "solver_correct": True, "success": True,
                               "verdicts": ["correct", "incorrect", None]}
    await env.reset(seed=4)
    await env.step({"solver": f"Answer: {env.answer + 1}"})  # wrong
    _, rewards, _, _, infos = await env.step(
        {"judge": "incorrect", "judge_1": "incorrect", "judge_2": "correct"})
    assert rewards == {"solver": pytest.approx((1 - weight) / 3), "judge": 1.0,
                       "judge_1": 1.0, "judge_2": 0.0}
    assert env.sample_action("judge_2") in ("correct", "incorrect")


async def test_judge_samples_contract_and_validation() -> None:
    report = await aa.check_env(SolverJudge(judge_samples=3), seed=1)
    assert report.ok, report
    one = SolverJudge()
    assert one.possible_agents == ["solver", "judge"]  # K = 1: the two-seat game as before
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="judge_samples must be an int >= 1"):
            SolverJudge(judge_samples=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "without", "reference"), [
    ({"digits": 1, "operations": "+-"}, "Task: 8 + 0 = ?\n", "Reference: 8\n"),
    ({"task": "countdown"}, "Task: Numbers: 9 1 2. Target: 18\n", "Reference: 18\n"),
])
async def test_judge_prompt_with_and_without_reference(kwargs, without, reference) -> None:
    head = "Judge the solver's answer. Reply 'correct' or 'incorrect'.\n"
    for sees, expected in ((False, head + without + "Solver: Answer: 5"),
                           (True, head + without + reference + "Solver: Answer: 5")):
        env = SolverJudge(judge_sees_reference=sees, judge_samples=2, **kwargs)
        await env.reset(seed=3)
        obs, *_ = await env.step({"solver": "  Answer: 5 "})
        assert {seat: [m["content"] for m in msgs] for seat, msgs in obs.items()} == {
            "judge": [expected], "judge_1": [expected]}
        assert env.judge_prompt("Answer: 5") == expected
        # the reference changes what the judge sees, not how it is paid
        _, rewards, _, _, infos = await env.step({"judge": "incorrect", "judge_1": "correct"})
        assert rewards == {"solver": 0.5, "judge": 1.0, "judge_1": 0.0}
        assert infos["judge"]["solver_correct"] is False
    with pytest.raises(ValueError, match="judge_sees_reference must be a bool, got 1"):
        SolverJudge(judge_sees_reference=1)  # type: ignore[arg-type]
