"""examples/genrm/judge: the judge's training data, the judged env, and a tiny end-to-end run."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from areal_agents.envs.arithmetic import parse_answer

from ._load import load_example


def test_judge_pairs_are_balanced_and_labelled_by_the_ground_truth():
    run = load_example("genrm/judge", "run")
    pairs = run.judge_pairs(range(200), random.Random(0))
    assert 70 < sum(ok for _, ok in pairs) < 130
    for episode, ok in pairs:
        question = episode.messages["agent"][0]["content"].splitlines()[-1].removesuffix(" = ?")
        gold = eval(question)  # one-digit a +/- b
        assert episode.infos["agent"]["answer"] == gold
        assert (episode.messages["agent"][1]["content"] == f"Answer: {gold}") == ok
    prompt = run.make_judge().render(pairs[0][0], "agent")
    gold = pairs[0][0].infos["agent"]["answer"]
    assert prompt.endswith("\nCorrect:") and f"\nReference: {gold}\n" in prompt


async def test_the_judged_env_gives_no_reward_but_keeps_the_exact_verdict():
    run = load_example("genrm/judge", "run")
    env = run.JudgedArithmetic(**run.ENV_KWARGS)
    await env.reset(seed=0)
    _, reward, done, _, info = await env.step(f"Answer: {env.answer}")
    assert (reward, done, info["success"]) == (0.0, True, True)
    await env.reset(seed=0)
    _, reward, _, _, info = await env.step(f"Answer: {env.answer + 1}")
    assert (reward, info["success"]) == (0.0, False)


@pytest.mark.slow
def test_tiny_run_writes_every_figure(tmp_path, capsys):
    run = load_example("genrm/judge", "run")
    assert run.main(["--steps", "1", "--batch-size", "4", "--group-size", "2",
                     "--policy-sft-steps", "5", "--judge-sft-steps", "5", "--judge-pairs", "32",
                     "--judge-eval-pairs", "8", "--eval-seeds", "4",
                     "--run-dir", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["judge_sft"]["steps"] == 5
    judge, exact = s["judge_reward"], s["exact_reward"]
    assert s["judge"]["pairs"] == 8.0 and 0.0 <= s["judge"]["accuracy"] <= 1.0
    assert judge["steps"] == exact["steps"] == 1
    assert judge["judge_calls"] + judge["judge_cache_hits"] >= 4  # every trained episode judged
    assert judge["judge_tokens_per_trained_token"] > 0
    assert "judge_calls" not in exact
    assert "held-out grading accuracy" in capsys.readouterr().out


def test_hard_negative_mix_and_answer_kinds():
    run = load_example("genrm/judge", "run")
    pairs = run.judge_pairs(range(400), random.Random(0), near=0.45, unformatted=0.05)
    kinds = [run.answer_kind(e, ok) for e, ok in pairs]
    assert 150 < kinds.count("near") < 210 and 8 < kinds.count("unformatted") < 35
    assert all((k == "right") == ok for k, (_, ok) in zip(kinds, pairs, strict=True))
    with pytest.raises(ValueError, match=r"near=0\.6, unformatted=0\.5: each must be >= 0"):
        run.judge_pairs(range(1), random.Random(0), near=0.6, unformatted=0.5)
    episode = pairs[0][0]
    short = run.make_judge(template=run.TEMPLATES["short"]).render(episode, "agent")
    gold, answer = episode.infos["agent"]["answer"], episode.messages["agent"][1]["content"]
    assert short == f"Reference: {gold}\n{answer}\nCorrect:"


def test_balance_resamples_the_smaller_class_up_to_the_larger():
    run = load_example("genrm/judge", "run")
    pairs = run.judge_pairs(range(100), random.Random(0), near=0.2, unformatted=0.0)
    n_right = sum(ok for _, ok in pairs)
    assert n_right > 60
    out = run.balance(pairs, random.Random(1))
    assert sum(ok for _, ok in out) == n_right == len(out) - n_right
    assert {id(e) for e, _ in out} == {id(e) for e, _ in pairs}  # every pair kept, none new
    only_right = [p for p in pairs if p[1]]
    assert run.balance(only_right, random.Random(1)) == only_right


@pytest.mark.slow
def test_policy_answers_are_labelled_by_exact_match_and_graded(tmp_path):
    run = load_example("genrm/judge", "run")
    args = run.parse_args(["--batch-size", "4", "--group-size", "2", "--policy-sft-steps", "5",
                           "--eval-seeds", "4", "--policy-pairs", "6", "--policy-eval", "4",
                           "--judge-sft-steps", "3", "--judge-pairs", "8", "--judge-only",
                           "--judge-eval-pairs", "4", "--run-dir", str(tmp_path)])
    answers = asyncio.run(run.policy_answers(args, tmp_path, range(5), samples=2))
    assert len(answers) == 10
    for episode, ok in answers:
        reply = [m for m in episode.messages["agent"] if m["role"] == "assistant"][-1]
        assert ok == (parse_answer(reply["content"]) == episode.infos["agent"]["answer"])
    s = asyncio.run(run.run(args))
    assert s["judge_data"]["policy_answers"] == 6.0
    assert s["judge_policy"]["pairs"] == 4.0
    wrong = s["judge_policy"]["wrong"]
    assert wrong == 0 or 0.0 <= s["judge_policy"]["false_positive_rate"] <= 1.0


def test_answer_kind_reads_the_reply_not_the_env_feedback_after_it():
    run = load_example("genrm/judge", "run")
    episode, _ = run.judge_pairs(range(1), random.Random(0))[0]
    gold = episode.infos["agent"]["answer"]
    episode.messages["agent"][1]["content"] = f"Answer: {gold + 1}"
    episode.messages["agent"].append({"role": "user", "content": "Wrong: wrong."})
    assert run.answer_kind(episode, False) == "near"
    episode.messages["agent"][1]["content"] = f"{gold + 1}"
    assert run.answer_kind(episode, False) == "unformatted"
