"""examples/genrm/solver_judge: SolverJudge's truth_weight and success infos, the judge tally,
and a tiny two-policy run."""

from __future__ import annotations

import json

import pytest

from areal_agents.envs.solver_judge import SolverJudge
from areal_agents.episode import Episode

from ._load import load_example


@pytest.fixture(scope="module")
def sj():
    return load_example("genrm/solver_judge", "run")


async def _final(env: SolverJudge, reply: str, verdict: str):
    await env.reset(seed=3)
    await env.step({"solver": reply})
    return await env.step({"judge": verdict})


@pytest.mark.parametrize(("weight", "solver_reward"), [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)])
async def test_truth_weight_mixes_verdict_and_ground_truth(weight, solver_reward) -> None:
    env = SolverJudge(digits=1, operations="+-", truth_weight=weight)
    await env.reset(seed=3)
    _, rewards, _, _, infos = await _final(env, f"Answer: {env.answer + 1}", "correct")
    assert rewards == {"solver": solver_reward, "judge": 0.0}  # a fooled judge
    assert infos["solver"]["success"] is False and infos["judge"]["success"] is False
    _, rewards, _, _, infos = await _final(env, f"Answer: {env.answer}", "correct")
    assert rewards == {"solver": 1.0, "judge": 1.0}
    assert infos["solver"]["success"] is True and infos["judge"]["success"] is True
    with pytest.raises(ValueError, match=r"truth_weight must be in \[0, 1\], got 2"):
        SolverJudge(truth_weight=2)


def test_tally_rates(sj) -> None:
    tally = sj.JudgeTally()
    cases = [(False, "correct"), (False, "incorrect"), (False, "incorrect"), (True, "correct"),
             (True, "incorrect"), (True, None)]
    for truth, verdict in cases:
        info = {"solver_correct": truth, "verdict": verdict}
        assert tally(Episode(["solver", "judge"], {}, {}, {}, 2, "terminated",
                             infos={"judge": info})) == 0.0
    assert tally.take_metrics() == {"judge_stats/episodes": 6.0,
                                    "judge_stats/false_positive_rate": 1 / 3,
                                    "judge_stats/false_negative_rate": 1 / 2,
                                    "judge_stats/no_verdict": 1 / 6}
    assert tally.take_metrics() == {"judge_stats/episodes": 0.0}


@pytest.mark.slow
def test_tiny_two_policy_run_logs_judge_metrics(sj, tmp_path, capsys) -> None:
    code = sj.main(["--run-dir", str(tmp_path), "--steps", "2", "--batch-size", "8",
                    "--group-size", "4", "--sft-steps", "5", "--demos", "16",
                    "--eval-seeds", "8"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2
    for fig in (summary["start"], summary["final"]):
        assert 0.0 <= fig["eval/judge/success"] <= 1.0 and fig["eval/judge_stats/episodes"] == 8
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/judge/success" in r]
    assert len(trained) == 2
    assert all(r["policy/solver/version"] == r["policy/judge/version"] for r in trained)
    assert all("judge_stats/episodes" in r for r in trained)
    assert "judge false-positive rate" in capsys.readouterr().out


def _judged(truth: bool, verdict: str) -> Episode:
    info = {"solver_correct": truth, "verdict": verdict, "success": (verdict == "correct") == truth}
    return Episode(["solver", "judge"], {}, {}, {}, 2, "terminated", infos={"judge": info})


def test_balanced_judge_reward_pays_always_incorrect_one_half(sj) -> None:
    # 1 right answer in 10: the agreement reward pays "always incorrect" 0.9, this one 0.5
    for verdicts, expected in ((lambda t: "incorrect", 0.5), (lambda t: "correct", 0.5),
                               (lambda t: "correct" if t else "incorrect", 1.0)):
        fn = sj.BalancedJudgeReward()
        fn.counts = {True: 100, False: 900}  # a long run's base rate: 10% right answers
        totals = []
        for truth in [True] + [False] * 9:
            episode = _judged(truth, verdicts(truth))
            totals.append(episode.infos["judge"]["success"] + fn(episode)["judge"])
        assert sum(totals) / 10 == pytest.approx(expected, abs=0.01)
    assert sj.BalancedJudgeReward()(Episode(["solver"], {}, {}, {}, 1, "terminated")) == {}
    fn = sj.BalancedJudgeReward()
    fn(_judged(True, "correct"))
    assert fn.take_metrics() == {"judge_balance/p_solver_correct": 2 / 3}


def test_mostly_right_solver_warm_start_and_balanced_reward_wiring(sj, tmp_path) -> None:
    player = sj.mostly_right_solver(0.8, seed=0)
    obs = "Reply with 'Answer: <number>'.\n3 + 4 = ?"
    replies = [player(obs) for _ in range(200)]
    right = sum(r == "Answer: 7" for r in replies)
    assert 140 <= right <= 180
    assert all(1 <= abs(int(r.removeprefix("Answer: ")) - 7) <= 3 for r in replies
               if r != "Answer: 7")
    args = sj.parse_args(["--run-dir", str(tmp_path), "--judge-reward", "balanced",
                          "--solver-demo-accuracy", "0.8", "--solver-sft-steps", "200"])
    trainer = sj.make_trainer(args, sj.JudgeTally())
    assert [type(f).__name__ for f in trainer.reward_fns] == ["JudgeTally", "BalancedJudgeReward"]
    assert (trainer.policies["solver"].sft_steps, trainer.policies["judge"].sft_steps) == (200, 100)
