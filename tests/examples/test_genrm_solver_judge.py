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
    assert tally.take_metrics() == {"judge_stats/episodes": 6.0, "judge_stats/verdicts": 6.0,
                                    "judge_stats/false_positive_rate": 1 / 3,
                                    "judge_stats/false_negative_rate": 1 / 2,
                                    "judge_stats/no_verdict": 1 / 6}
    assert tally.take_metrics() == {"judge_stats/episodes": 0.0, "judge_stats/verdicts": 0.0}


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


# --- round 3: the judge warm-started on the solver's own answers, per-class normalisation ----


@pytest.fixture(scope="module")
def balance_mod(sj):  # loaded by run.py from the example folder
    import class_balance

    return class_balance


def _group(rows: list[tuple[bool, str]]) -> list[Episode]:
    return [_judged(truth, verdict) for truth, verdict in rows]


def test_per_class_reward_gives_a_blind_judge_no_push_towards_the_majority(balance_mod) -> None:
    # 2 right answers, 8 wrong; the judge says "correct" to half of each class (it cannot tell)
    rows = [(True, "correct"), (True, "incorrect")] + [(False, "correct")] * 4 + [
        (False, "incorrect")] * 4
    plain = balance_mod.PerClassJudgeReward(normalise=False)
    assert plain(_group(rows)) == [{"judge": 0.0}] * 10  # diagnostics only
    m = plain.take_metrics()
    # agreement reward, group-centred: "incorrect" gets +1.5 in all, "correct" -1.5
    adv = [(1.0 if t == (v == "correct") else 0.0) - 0.5 for t, v in rows]
    assert sum(a for a, (_, v) in zip(adv, rows, strict=True) if v == "correct") == pytest.approx(-1.5)
    assert m["judge_groups/p_right"] == 0.2 and m["judge_groups/said_correct"] == 0.5
    assert m["judge_groups/accuracy_right"] == 0.5 and m["judge_groups/accuracy_wrong"] == 0.5
    assert m["judge_groups/balanced_accuracy"] == 0.5 and m["judge_groups/mixed_groups"] == 1.0
    assert m["judge_groups/advantage_right"] == pytest.approx(0.0)

    fn = balance_mod.PerClassJudgeReward()
    fn.p_right = 0.2  # the running share of right answers
    episodes = _group(rows)
    totals = [e.infos["judge"]["success"] + d["judge"]
              for e, d in zip(episodes, fn(episodes), strict=True)]
    # 0.5 / p_c * (agreed - 0.5): right answers +-1.25, wrong ones +-0.3125
    assert totals == pytest.approx([1.25, -1.25] + [-0.3125] * 4 + [0.3125] * 4)
    said_correct = [t for t, (_, v) in zip(totals, rows, strict=True) if v == "correct"]
    assert sum(said_correct) == pytest.approx(0.0) and sum(totals) == pytest.approx(0.0)
    # the running figures moved towards this group's (decay 0.9)
    assert fn.p_right == pytest.approx(0.2) and fn.accuracy == {True: 0.5, False: 0.5}


def test_per_class_reward_pays_a_checking_judge_in_both_classes(balance_mod) -> None:
    fn = balance_mod.PerClassJudgeReward(decay=0.5)
    fn.p_right, fn.accuracy = 0.25, {True: 0.5, False: 0.75}
    rows = [(True, "correct"), (False, "incorrect"), (False, "incorrect"), (False, "correct")]
    episodes = _group(rows)
    totals = [e.infos["judge"]["success"] + d["judge"]
              for e, d in zip(episodes, fn(episodes), strict=True)]
    assert totals == pytest.approx([2.0 * 0.5, 0.5 / 0.75 * 0.25, 0.5 / 0.75 * 0.25,
                                    0.5 / 0.75 * -0.75])
    assert fn.p_right == pytest.approx(0.5 * 0.25 + 0.5 * 0.25)
    assert fn.accuracy == {True: pytest.approx(0.75), False: pytest.approx(0.5 * 0.75 + 0.5 * 2 / 3)}
    m = fn.take_metrics()
    mean = (1.0 + 2 * (0.5 / 0.75 * 0.25) - 0.5) / 4  # the group's mean, subtracted by GRPO
    assert m["judge_groups/advantage_right"] == pytest.approx(1.0 - mean)
    assert m["judge_groups/advantage_wrong"] == pytest.approx((2 / 6 - 0.5) / 3 - mean)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        balance_mod.PerClassJudgeReward(decay=1.0)
    assert fn([Episode(["solver"], {}, {}, {}, 1, "terminated")]) == [{}]


def test_verdict_rates_and_balanced_judge_transcripts(sj) -> None:
    import own_answers

    rates = own_answers.verdict_rates([(True, "correct"), (True, None), (False, "incorrect"),
                                       (False, "correct"), (False, "incorrect")])
    assert rates == {"answers": 5.0, "right": 2.0, "accuracy": 0.6, "said_correct": 0.4,
                     "no_verdict": 0.2, "false_negative_rate": 0.5,
                     "false_positive_rate": pytest.approx(1 / 3),
                     "balanced_accuracy": pytest.approx(0.5 * (0.5 + 2 / 3))}
    answers = [own_answers.Answer(s, f"Answer: {s}", f"prompt {s}", s == 0) for s in range(4)]
    transcripts = own_answers.judge_transcripts(answers, seed=0)
    verdicts = [t[1]["content"] for t in transcripts]
    assert sorted(verdicts) == ["correct"] * 3 + ["incorrect"] * 3  # the right one resampled
    assert {t[0]["content"] for t in transcripts if t[1]["content"] == "correct"} == {"prompt 0"}
    before = ["correct", "incorrect", "correct", None]  # answer 0 is right, 1-3 wrong
    after = ["incorrect", "incorrect", "incorrect", "incorrect"]
    assert own_answers.paired_change(answers, before, after) == {
        "kept": 1, "gained": 2, "lost": 1, "neither": 0}


@pytest.mark.slow
def test_tiny_run_with_own_answer_warm_start_grades_the_judge_over_steps(sj, tmp_path) -> None:
    code = sj.main(["--run-dir", str(tmp_path), "--steps", "2", "--batch-size", "16",
                    "--group-size", "8", "--sft-steps", "5", "--demos", "16", "--eval-seeds",
                    "8", "--judge-warm-start", "own-answers", "--own-answers", "24",
                    "--judge-held-out", "12", "--judge-sft-steps", "3", "--judge-eval-every",
                    "1", "--judge-reward", "per-class", "--truth-weight", "0.5"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and [r["step"] for r in summary["per_step"]] == [1, 2]
    assert [r["step"] for r in summary["judge_heldout"]] == [0, 1, 2]
    assert all(r["answers"] == 12.0 for r in summary["judge_heldout"])
    data = summary["judge_data"]
    assert data["answers"] == 24 and data["held_out"] == 12
    right = data["right"]
    assert data["balanced"] == (2 * max(right, 24 - right) if 0 < right < 24 else 24)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/judge/success" in r]
    assert len(trained) == 2 and all("judge_groups/p_right" in r for r in trained)
    assert sum("heldout_judge/accuracy" in r for r in rows) == 3


def test_per_class_wiring_turns_off_the_judges_std_normalisation(sj, tmp_path) -> None:
    args = sj.parse_args(["--run-dir", str(tmp_path), "--judge-reward", "per-class",
                          "--judge-kl", "0.01", "--judge-entropy", "0.02"])
    trainer = sj.make_trainer(args, sj.JudgeTally())
    assert [type(f).__name__ for f in trainer.rewards.group_reward_fns] == ["PerClassJudgeReward"]
    assert trainer.rewards.group_reward_fns[0].normalise is True
    assert trainer.algorithms["judge"].std_normalize is False
    assert trainer.algorithms["judge"].kl_coef == 0.01
    assert trainer.algorithms["judge"].entropy_coef == 0.02
    assert trainer.algorithms["solver"].std_normalize is True


# --- round 4: several judge verdicts per answer, grouped per answer --------------------------


def _verdict_sample(seat: str, episode: str, reward: float, group: str = "7"):
    from areal_agents.samples import Sample

    return Sample([1, 2], [0, 1], [0.0, -0.5], [-1, 0], reward=reward, agent=seat,
                  policy="judge", group=group, meta={"episode": episode})


def test_judge_policy_groups_the_verdicts_on_one_answer(sj, tmp_path) -> None:
    """With K > 1 the judge policy's GRPO is the library's ``group_by="episode"``: the K
    verdicts on one answer form a group; the solver keeps (task, agent) groups."""
    args = sj.parse_args(["--run-dir", str(tmp_path), "--judge-reward", "per-class",
                          "--judge-samples", "3"])
    algorithms = sj.make_trainer(args, sj.JudgeTally()).algorithms
    # two answers to task 7 (episodes a, b), 3 verdicts each; answer b is easy (all agree)
    rows = [("judge", "a", 1.0), ("judge_1", "a", 0.0), ("judge_2", "a", 0.0),
            ("judge", "b", 1.0), ("judge_1", "b", 1.0), ("judge_2", "b", 1.0)]
    samples = [_verdict_sample(*r) for r in rows]
    assert algorithms["judge"].advantages(samples) == pytest.approx(
        [2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])  # per-class: no std normalisation
    # per (task, seat) instead, each group mixes the two answers
    assert algorithms["solver"].group_by == "role"
    assert type(algorithms["judge"])(std_normalize=False).advantages(samples) == pytest.approx(
        [0.0, -0.5, -0.5, 0.0, 0.5, 0.5])
    # another task's answer with the same episode id is another group
    other = _verdict_sample("judge", "a", 1.0, group="8")
    assert algorithms["judge"].advantages([*samples, other])[-1] == 0.0


def _k_verdicts(truth: bool, verdicts: list[str | None]) -> Episode:
    seats = ["judge", *(f"judge_{k}" for k in range(1, len(verdicts)))]
    infos = {s: {"solver_correct": truth, "verdict": v, "success": (v == "correct") == truth
                 if v else False} for s, v in zip(seats, verdicts, strict=True)}
    infos["solver"] = {"solver_correct": truth, "verdict": verdicts[0], "success": truth}
    return Episode(["solver", *seats], {}, {}, {}, 2, "terminated", infos=infos)


def test_tally_and_per_class_reward_count_every_verdict(sj, balance_mod) -> None:
    tally = sj.JudgeTally()
    tally(_k_verdicts(True, ["correct", "incorrect", None]))
    tally(_k_verdicts(False, ["correct", "incorrect", "incorrect"]))
    assert tally.take_metrics() == {"judge_stats/episodes": 2.0, "judge_stats/verdicts": 6.0,
                                    "judge_stats/false_positive_rate": 1 / 3,
                                    "judge_stats/false_negative_rate": 1 / 2,
                                    "judge_stats/no_verdict": 1 / 6}
    fn = balance_mod.PerClassJudgeReward(per_answer=True)
    fn.p_right = 0.25
    episodes = [_k_verdicts(True, ["correct", "incorrect", "incorrect"]),
                _k_verdicts(False, ["incorrect", "incorrect", "incorrect"])]
    rows = fn(episodes)
    assert [sorted(r) for r in rows] == [["judge", "judge_1", "judge_2"]] * 2  # not the solver
    totals = [e.infos[s]["success"] + rows[i][s] for i, e in enumerate(episodes)
              for s in ("judge", "judge_1", "judge_2")]
    # 0.5 / p_c * (agreed - 0.5): right answers (p = 0.25) +-1.0, wrong ones +1/3
    assert totals == pytest.approx([1.0, -1.0, -1.0, 1 / 3, 1 / 3, 1 / 3])
    m = fn.take_metrics()
    assert m["judge_groups/split_answers"] == 0.5  # only answer 1's verdicts disagree
    # per-answer centring: the right answer's verdicts average -1/3; all-agreeing ones 0
    assert m["judge_groups/advantage_right"] == pytest.approx(0.0)
    assert m["judge_groups/advantage_wrong"] == pytest.approx(0.0)
    assert m["judge_groups/accuracy_right"] == pytest.approx(1 / 3)


def test_judge_samples_wiring(sj, tmp_path) -> None:
    args = sj.parse_args(["--run-dir", str(tmp_path), "--judge-reward", "per-class",
                          "--judge-samples", "4", "--judge-temperature", "1.5"])
    trainer = sj.make_trainer(args, sj.JudgeTally())
    assert trainer.policy_of == {"solver": "solver", "judge": "judge", "judge_1": "judge",
                                 "judge_2": "judge", "judge_3": "judge"}
    assert trainer.algorithms["judge"].group_by == "episode"
    assert trainer.algorithms["judge"].std_normalize is False
    assert trainer.algorithms["solver"].group_by == "role"
    assert trainer.policies["judge"].sampling["temperature"] == 1.5
    assert trainer.policies["solver"].sampling["temperature"] == 1.0
    assert trainer.rewards.group_reward_fns[0].per_answer is True
    args = sj.parse_args(["--run-dir", str(tmp_path), "--judge-samples", "4",
                          "--judge-groups", "task"])
    assert sj.make_trainer(args, sj.JudgeTally()).algorithms["judge"].group_by == "role"
    args = sj.parse_args(["--run-dir", str(tmp_path), "--judge-samples", "4", "--judge-groups",
                          "none", "--solver-lr", "1e-4", "--judge-lr", "5e-4"])
    trainer = sj.make_trainer(args, sj.JudgeTally())
    assert trainer.algorithms["judge"].baseline == "ema"  # no groups: a moving average
    assert trainer.algorithms["solver"].baseline == "group"
    assert (trainer.policies["solver"].lr, trainer.policies["judge"].lr) == (1e-4, 5e-4)
    with pytest.raises(ValueError, match="--judge-groups answer needs --judge-samples >= 2"):
        sj.make_trainer(sj.parse_args(["--judge-groups", "answer"]), sj.JudgeTally())


@pytest.mark.slow
async def test_k_verdicts_are_recorded_with_their_exact_tokens(sj) -> None:
    """A tiny judge, asked 3 times per answer through the Trainer's gateway seats: each
    verdict is one sample of its seat, with the same prompt ids, the tokens the engine
    generated (decoded: the verdict the env parsed), its own agreement reward, and the three
    share one per-answer group."""
    import own_answers

    from areal_agents.agents import ScriptedAgent
    from areal_agents.algorithms.turn_groups import credit_group_ids
    from areal_agents.envs.solver_judge import SolverJudge, parse_verdict
    from areal_agents.trainers.episodes import play

    answers = [own_answers.Answer(s, "", f"Judge the solver's answer. Task: {s} + 1 = ?",
                                  s % 2 == 0) for s in range(8)]
    judge, tokenizer, _ = own_answers.sft_judge(own_answers.judge_transcripts(answers, 0),
                                                steps=30, lr=3e-3, seed=1)
    args = sj.parse_args(["--judge-samples", "3", "--judge-reward", "per-class"])
    trainer = sj.make_trainer(args, sj.JudgeTally(), models={
        "solver": aa_tiny(), "judge": (judge, tokenizer)})
    await trainer.setup()
    try:
        seen_rewards = set()
        for seed, right in ((0, True), (1, False), (2, True), (3, False)):
            env = SolverJudge(**sj.env_kwargs(args, 3))
            await env.reset(seed=seed)
            reply = f"Answer: {env.answer if right else env.answer + 1}"
            by_policy, stats = await play(
                SolverJudge(**sj.env_kwargs(args, 3)), seed,
                policy_of={"judge": "judge", "judge_1": "judge", "judge_2": "judge"},
                fixed_agents={"solver": ScriptedAgent(lambda obs, r=reply: r)},
                open_seat=trainer._open_seat, reward_fns=[])
            episode = stats.episode
            samples = by_policy["judge"]
            assert sorted(s.agent for s in samples) == ["judge", "judge_1", "judge_2"]
            prompts = set()
            for s in samples:
                first = s.loss_mask.index(1)
                assert sum(s.loss_mask[first:]) == len(s.token_ids) - first  # one turn
                prompts.add(tuple(s.token_ids[:first]))
                text = tokenizer.decode(s.token_ids[first:]).removesuffix("<|im_end|>")
                reply_msg = next(m["content"] for m in episode.messages[s.agent]
                                 if m["role"] == "assistant")
                assert text == reply_msg  # the exact generated tokens, nothing re-tokenized
                assert all(lp <= 0.0 for lp in s.logprobs[first:])
                info = episode.infos[s.agent]
                assert parse_verdict(text) == info["verdict"]
                agreed = info["verdict"] is not None and (info["verdict"] == "correct") == right
                assert s.reward == float(agreed) == stats.returns[s.agent]
                seen_rewards.add(s.reward)
            assert len(prompts) == 1  # the same prompt ids, K times
            assert tokenizer.decode(next(iter(prompts))).endswith(reply)
            assert len({s.meta["episode"] for s in samples}) == 1
            assert credit_group_ids(samples, "episode").tolist() == [0, 0, 0]
        assert seen_rewards == {0.0, 1.0}  # both outcomes occurred
    finally:
        await trainer.aclose()


TINY_OWN_ANSWERS = [
    "--steps", "2", "--batch-size", "16", "--group-size", "8", "--sft-steps", "5", "--demos", "16",
    "--eval-seeds", "8", "--judge-warm-start", "own-answers", "--own-answers", "24",
    "--judge-held-out", "12", "--judge-sft-steps", "3", "--judge-eval-every", "1",
    "--judge-reward", "per-class", "--truth-weight", "0.5"]
"""The tiny own-answers run of the K-verdict and replay tests (each adds its own options)."""


def aa_tiny():
    import areal_agents as aa

    return aa.models.tiny("xs", seed=0)


@pytest.mark.slow
def test_tiny_run_with_k_verdicts_per_answer(sj, tmp_path) -> None:
    cache = tmp_path / "warm"
    argv = [*TINY_OWN_ANSWERS, "--judge-samples", "3", "--warm-start-cache", str(cache)]
    assert sj.main(["--run-dir", str(tmp_path / "a"), *argv]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/judge/success" in r]
    assert len(trained) == 2
    for r in trained:  # 16 episodes a step, 3 verdicts (judge samples) each
        assert r["judge_stats/verdicts"] == 3 * r["judge_stats/episodes"] > 0  # as finished
        assert r["policy/judge/num_samples"] == 48 and r["policy/solver/num_samples"] == 16
        assert "judge_groups/split_answers" in r and "train/judge_2/success" in r
    first = json.loads((tmp_path / "a/summary.json").read_text())
    # a second run reads the cached warm start: the same held-out grading at step 0
    assert sj.main(["--run-dir", str(tmp_path / "b"), *argv]) == 0
    second = json.loads((tmp_path / "b/summary.json").read_text())
    assert second["judge_heldout"][0] == first["judge_heldout"][0]
    assert second["judge_data"] == first["judge_data"]
    with pytest.raises(ValueError, match=r"other settings \(\['judge_sft_steps'\]\)"):
        sj.main(["--run-dir", str(tmp_path / "c"), *argv, "--judge-sft-steps", "4"])


# --- round 6: replay of the starting solver's answers in the judge's batches ------------------


@pytest.fixture(scope="module")
def replay_mod(sj):  # loaded by run.py from the example folder
    import replay

    return replay


async def _answers(sj, seeds: list[int], wrong_every: int = 3) -> list:
    """Scripted solver answers (every ``wrong_every``-th off by one) with the env's judge
    prompts and truth, as ``own_answers.sample_answers`` stores them."""
    from areal_agents.agents import ScriptedAgent
    from areal_agents.agents.players import arithmetic_solver
    from areal_agents.episode import run_episode

    out = []
    for k, seed in enumerate(seeds):
        def solver(obs, k=k):
            right = arithmetic_solver(obs)
            n = int(right.removeprefix("Answer: "))
            return right if k % wrong_every else f"Answer: {n + 1}"

        episode = await run_episode(SolverJudge(**sj.env_kwargs(sj.parse_args([]))), {
            "solver": ScriptedAgent(solver), "judge": ScriptedAgent(lambda o: "correct")},
            seed=seed)
        out.append(sj.Answer(seed, episode.messages["solver"][-1]["content"],
                             episode.messages["judge"][0]["content"],
                             bool(episode.infos["judge"]["solver_correct"])))
    return out


def test_replay_pool_is_disjoint_from_the_held_out_answers(sj, replay_mod) -> None:
    a = sj.Answer
    held = [a(100, "Answer: 3", "p-held", True)]
    pool, dropped = replay_mod.disjoint_pool(
        [a(1, "Answer: 3", "p-held", True), a(2, "Answer: 4", "p2", False)], held)
    assert pool == [a(2, "Answer: 4", "p2", False)] and dropped == 1
    with pytest.raises(ValueError, match=r"share task seeds \[100\]"):
        replay_mod.disjoint_pool([a(100, "x", "p3", False)], held)
    # the seed-disjoint diagnostic keeps shared prompts, never shared seeds
    same = [a(1, "Answer: 3", "p-held", True)]
    assert replay_mod.disjoint_pool(same, held, by="seed") == (same, 0)
    with pytest.raises(ValueError, match="share task seeds"):
        replay_mod.disjoint_pool([a(100, "x", "p3", False)], held, by="seed")
    seed_only = replay_mod.ReplayPool(0.5, group_size=8, eval_from=1000)
    seed_only.fill(same, held, by="seed")
    with pytest.raises(ValueError, match="in the held-out set"):
        seed_only.fill([a(100, "x", "p3", False)], held, by="seed")
    rp = replay_mod.ReplayPool(0.5, group_size=8, eval_from=1000)
    with pytest.raises(ValueError, match="1 pool answers are in the held-out set"):
        rp.fill([a(1, "Answer: 3", "p-held", True)], held)
    with pytest.raises(RuntimeError, match="before fill"):
        rp.draw(5)
    with pytest.raises(ValueError, match="leaves 1 live episode"):
        replay_mod.ReplayPool(0.9, group_size=8, eval_from=1000)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        replay_mod.ReplayPool(1.0, group_size=8, eval_from=1000)


def test_replay_draws_a_fixed_share_of_each_group_and_never_evaluation_seeds(sj,
                                                                            replay_mod) -> None:
    rp = replay_mod.ReplayPool(0.25, group_size=8, eval_from=1000, seed=0)
    answers = [sj.Answer(s, f"Answer: {s}", f"p{s}", s % 2 == 0) for s in range(50)]
    rp.fill(answers, held_out=[])
    # two groups' members interleaved: 2 of each group's 8 replay, whatever the order
    draws = [(seed, rp.draw(seed)) for _ in range(8) for seed in (3, 4)]
    for seed in (3, 4):
        drawn = [d for s, d in draws if s == seed]
        assert sum(d is not None for d in drawn) == 2
        assert all(d in answers for d in drawn if d is not None)
    assert rp._resets == {}  # both groups complete: nothing kept
    assert all(rp.draw(1000 + k) is None for k in range(20))  # evaluation seeds
    assert all(replay_mod.ReplayPool(0.0, 8, 1000).draw(k) is None for k in range(20))


async def test_replay_episodes_grade_pool_answers_and_are_counted(sj, replay_mod) -> None:
    """A replay episode: the judge (scripted: says "correct") grades a pool answer, with the
    pool's truth; the solver does not act and gets nothing; the tallies count it."""
    from areal_agents.agents import ScriptedAgent
    from areal_agents.episode import run_episode

    answers = await _answers(sj, list(range(sj.TRAIN_SEEDS, sj.TRAIN_SEEDS + 6)))
    held_out = await _answers(sj, list(range(sj.HELD_OUT_SEEDS, sj.HELD_OUT_SEEDS + 4)))
    pool, _ = replay_mod.disjoint_pool(answers, held_out)
    assert {a.correct for a in pool} == {True, False}
    rp = replay_mod.ReplayPool(0.5, group_size=4, eval_from=1000, seed=1)
    rp.fill(pool, held_out)
    kwargs = {**sj.env_kwargs(sj.parse_args(["--truth-weight", "0.5"])), "judge_samples": 2}
    tally, replay_tally = sj.JudgeTally(), replay_mod.ReplayTally()
    said = []

    def solver(obs):
        said.append(obs)
        return "Answer: 1"

    episodes = []
    for _ in range(4):  # one group of 4 at task seed 7: 2 replay, 2 live
        env = replay_mod.ReplaySolverJudge(rp, **kwargs)
        episode = await run_episode(env, {"solver": ScriptedAgent(solver),
                                          "judge": ScriptedAgent(lambda o: "correct"),
                                          "judge_1": ScriptedAgent(lambda o: "incorrect")},
                                    seed=7)
        episodes.append((env.replayed, episode))
        tally(episode), replay_tally(episode)
    replayed = [(a, e) for a, e in episodes if a is not None]
    assert len(replayed) == 2 and len(said) == 2  # the solver acted in the 2 live ones only
    held_prompts = {h.prompt for h in held_out}
    for answer, episode in replayed:
        assert answer in pool and answer.prompt not in held_prompts
        assert episode.messages["solver"] == []
        assert episode.messages["judge"][0]["content"] == answer.prompt
        assert "solver" not in episode.returns or episode.returns["solver"] == 0.0
        for seat, agreed in (("judge", answer.correct), ("judge_1", not answer.correct)):
            info = episode.infos[seat]
            assert info["replay"] is True and info["solver_correct"] == answer.correct
            assert info["success"] == agreed and episode.returns[seat] == float(agreed)
    for _, episode in (e for e in episodes if e[0] is None):
        assert "replay" not in episode.infos["judge"] and episode.messages["solver"]
    metrics = replay_tally.take_metrics()
    assert metrics["replay/episodes"] == 2 and metrics["live/episodes"] == 2
    assert metrics["replay/share"] == 0.5
    assert metrics["replay/judge_accuracy"] == 0.5  # one of the two seats agrees, always
    live = [e for a, e in episodes if a is None]
    truth = [e.infos["solver"]["success"] for e in live]
    assert metrics["live/solver_success"] == sum(truth) / 2
    counts = tally.take_metrics()
    assert counts["judge_stats/episodes"] == 4 and counts["judge_stats/verdicts"] == 8


async def test_replay_refuses_a_pool_answer_the_env_renders_otherwise(sj, replay_mod) -> None:
    rp = replay_mod.ReplayPool(0.5, group_size=4, eval_from=1000)
    (answer,) = await _answers(sj, [sj.TRAIN_SEEDS])
    rp.fill([sj.Answer(answer.seed, answer.reply, "another prompt", answer.correct)], [])
    env = replay_mod.ReplaySolverJudge(rp, **sj.env_kwargs(sj.parse_args([])))
    with pytest.raises(ValueError, match="another judge prompt"):
        await env.reset(seed=3)


def test_replay_wiring(sj, replay_mod, tmp_path) -> None:
    args = sj.parse_args(["--run-dir", str(tmp_path), "--judge-replay", "0.5"])
    with pytest.raises(ValueError, match="needs a replay pool"):
        sj.make_trainer(args, sj.JudgeTally())
    with pytest.raises(ValueError, match="needs --judge-warm-start own-answers"):
        sj.main(["--run-dir", str(tmp_path), "--judge-replay", "0.5"])
    pool = replay_mod.ReplayPool(0.5, 4, sj.EVAL_SEEDS)
    trainer = sj.make_trainer(args, sj.JudgeTally(), replay=pool)
    assert isinstance(trainer.make_env(), replay_mod.ReplaySolverJudge)
    assert trainer.make_env().pool is pool
    assert [type(f).__name__ for f in trainer.reward_fns] == ["JudgeTally", "ReplayTally"]


@pytest.mark.slow
def test_tiny_run_with_replay_of_the_starting_solvers_answers(sj, tmp_path) -> None:
    cache = tmp_path / "warm"
    argv = [*TINY_OWN_ANSWERS, "--judge-samples", "2", "--judge-replay", "0.5", "--warm-start-cache", str(cache)]
    for run in ("a", "b"):  # a: the fresh warm start's answers; b: the cached pool
        assert sj.main(["--run-dir", str(tmp_path / run), *argv]) == 0
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        pool = summary["judge_data"]["replay"]
        assert pool["answers"] == 24 and pool["sampled_now"] is False
        assert pool["pool"] == 24 - pool["dropped_shared_prompt"] > 0
        assert pool["per_group"] == 4 and pool["held_out_prompt_in_pool"] == 0
        by_pool = summary["heldout_by_pool_prompt"]
        assert list(by_pool) == ["not_in_pool"] and by_pool["not_in_pool"]["start"] == {
            k: v for k, v in summary["judge_heldout"][0].items() if k != "step"}
        probe = summary["replay_pool_judge"]  # the judge graded on pool answers too
        assert [r["step"] for r in probe] == [0, 1, 2]
        assert all(r["answers"] == min(12, pool["pool"]) for r in probe)
        rows = [json.loads(line)
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        trained = [r for r in rows if "train/judge/success" in r]
        assert len(trained) == 2
        for r in trained:  # 2 groups of 8 a step: 4 replay + 4 live episodes each
            assert r["replay/episodes"] + r["live/episodes"] == r["judge_stats/episodes"]
            assert r["policy/judge/num_samples"] == 2 * 16
            assert r["policy/solver/num_samples"] == 8
    saved = json.loads((cache / "replay_pool.json").read_text())
    held_out = json.loads((cache / "warm_start.json").read_text())["held_out"]
    assert len(saved) == 24
    assert {a["seed"] for a in saved}.isdisjoint({a["seed"] for a in held_out})
    held = {a["prompt"] for a in held_out}
    assert pool["dropped_shared_prompt"] == sum(a["prompt"] in held for a in saved)
    # c: a cache without the pool (as rounds 4-5 wrote): sampled from the starting solver
    (cache / "replay_pool.json").unlink()
    assert sj.main(["--run-dir", str(tmp_path / "c"), *argv[2:], "--steps", "1"]) == 0
    pool = json.loads((tmp_path / "c/summary.json").read_text())["judge_data"]["replay"]
    assert pool["sampled_now"] is True and pool["answers"] == 24
    assert len(json.loads((cache / "replay_pool.json").read_text())) == 24


# --- round 7: a reference-guided trainable judge -----------------------------------------------


async def test_judge_reference_flag_reaches_every_judge_prompt(sj) -> None:
    import own_answers as own
    plain, guided = sj.env_kwargs(sj.parse_args([])), sj.env_kwargs(
        sj.parse_args(["--judge-reference"]), 4)
    assert plain["judge_sees_reference"] is False and guided["judge_sees_reference"] is True
    assert guided["judge_samples"] == 4
    env = SolverJudge(**plain)
    await env.reset(seed=7)
    answers = [own.Answer(7, " Answer: 3", env.judge_prompt("Answer: 3"), env.answer == 3),
               own.Answer(7, f"Answer: {env.answer}", "", True)]
    again = await own.rerender(plain, answers)  # the env's prompt, unchanged without the flag
    assert again[0] == answers[0] and again[1].prompt == env.judge_prompt(f"Answer: {env.answer}")
    head = f"Judge the solver's answer. Reply 'correct' or 'incorrect'.\nTask: {env.question} = ?\n"
    ref = await own.rerender({**guided, "judge_samples": 1}, answers)
    assert [a.prompt for a in ref] == [f"{head}Reference: {env.answer}\nSolver: Answer: 3",
                                       f"{head}Reference: {env.answer}\nSolver: Answer: {env.answer}"]
    assert [(a.seed, a.reply, a.correct) for a in ref] == [
        (a.seed, a.reply, a.correct) for a in answers]
    with pytest.raises(ValueError, match="seed 7: the env's verifier disagrees"):
        await own.rerender(plain, [own.Answer(7, f"Answer: {env.answer}", "", False)])


@pytest.mark.slow
def test_tiny_reference_guided_run_reuses_a_solver_and_its_answers(sj, tmp_path) -> None:
    base = ["--steps", "1", "--batch-size", "16", "--group-size", "8", "--sft-steps", "5",
            "--demos", "16", "--eval-seeds", "8", "--judge-warm-start", "own-answers",
            "--own-answers", "24", "--judge-held-out", "12", "--judge-sft-steps", "3",
            "--judge-eval-every", "1", "--judge-reward", "per-class", "--truth-weight", "0.5",
            "--judge-samples", "2"]
    plain, guided = tmp_path / "plain", tmp_path / "guided"
    # a: a plain warm start that keeps its training answers (the replay pool)
    assert sj.main(["--run-dir", str(tmp_path / "a"), *base, "--judge-replay", "0.5",
                    "--warm-start-cache", str(plain)]) == 0
    argv = [*base, "--steps", "2", "--judge-reference", "--reuse-solver", str(plain),
            "--warm-start-cache", str(guided)]
    assert sj.main(["--run-dir", str(tmp_path / "b"), *argv]) == 0
    summary = json.loads((tmp_path / "b/summary.json").read_text())
    assert summary["steps"] == 2 and [r["step"] for r in summary["judge_heldout"]] == [0, 1, 2]
    old = json.loads((plain / "warm_start.json").read_text())
    new = json.loads((guided / "warm_start.json").read_text())
    assert new["settings"]["judge_reference"] is True
    assert new["settings"]["reuse_solver"] == str(plain)
    assert [(a["seed"], a["reply"], a["correct"]) for a in new["held_out"]] == [
        (a["seed"], a["reply"], a["correct"]) for a in old["held_out"]]
    for a, b in zip(old["held_out"], new["held_out"], strict=True):
        task, solver = a["prompt"].split("\nSolver: ")
        assert b["prompt"].startswith(task + "\nReference: ") and b["prompt"].endswith(
            "\nSolver: " + solver)
    pool = json.loads((guided / "replay_pool.json").read_text())
    assert len(pool) == 24 and all("\nReference: " in a["prompt"] for a in pool)
    assert summary["judge_data"]["answers"] == 24 and summary["judge_data"]["held_out"] == 12
    assert (guided / "solver" / "config.json").read_bytes() == (
        plain / "solver" / "config.json").read_bytes()
    # the cached reference warm start is read back: the same step-0 grading
    assert sj.main(["--run-dir", str(tmp_path / "c"), *argv[:-4], "--steps", "1",
                    "--judge-reference", "--reuse-solver", str(plain),
                    "--warm-start-cache", str(guided)]) == 0
    again = json.loads((tmp_path / "c/summary.json").read_text())
    assert again["judge_heldout"][0] == summary["judge_heldout"][0]
    with pytest.raises(ValueError, match=r"other settings \(\['solver_sft_steps'\]\)"):
        sj.main(["--run-dir", str(tmp_path / "d"), *argv, "--solver-sft-steps", "9",
                 "--warm-start-cache", str(tmp_path / "e")])
    # f: the documented command's form, a fresh warm start with the reference-guided judge
    fresh = tmp_path / "fresh"
    assert sj.main(["--run-dir", str(tmp_path / "f"), *base, "--judge-reference",
                    "--warm-start-cache", str(fresh)]) == 0
    held = json.loads((fresh / "warm_start.json").read_text())["held_out"]
    assert len(held) == 12 and all("\nReference: " in a["prompt"] for a in held)
    summary = json.loads((tmp_path / "f/summary.json").read_text())
    assert [r["step"] for r in summary["judge_heldout"]] == [0, 1]
