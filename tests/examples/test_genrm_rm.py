"""examples/genrm/bradley_terry: harvested pairs, reward-free env, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from areal_agents.envs.arithmetic import score
from areal_agents.rewards.reward_model import read_pairs

from ._load import load_example


@pytest.fixture(scope="module")
def bt():
    return load_example("genrm/bradley_terry", "run")


def test_pairs_prefer_the_ground_truth_answer(bt) -> None:
    by_kind = bt.make_pairs(range(20), seed=0)
    assert sorted(by_kind) == sorted(bt.KINDS) and all(len(v) == 20 for v in by_kind.values())
    for kind, pairs in by_kind.items():
        for p in pairs:
            answer = int(p.chosen.removeprefix("Answer: "))
            assert score(p.chosen, answer)[0] == 1.0 and score(p.rejected, answer)[0] == 0.0
            assert p.prompt[-1]["content"].endswith("= ?") and p.prompt[-1]["role"] == "user"
        if kind == "near":
            assert all(1 <= abs(int(p.rejected.split()[-1]) - int(p.chosen.split()[-1])) <= 3
                       for p in pairs)
        if kind == "format":
            assert all(not p.rejected.startswith("Answer:") for p in pairs)


async def test_reward_free_env_keeps_exact_match_as_success(bt) -> None:
    env = bt.RewardFreeArithmetic(**bt.ENV_KWARGS)
    await env.reset(seed=0)
    _, reward, done, _, info = await env.step(f"Answer: {env.answer}")
    assert (reward, done, info["success"]) == (0.0, True, True)
    await env.reset(seed=0)
    assert (await env.step(f"Answer: {env.answer + 1}"))[4]["success"] is False


@pytest.mark.slow
def test_tiny_run_writes_pairs_reward_model_and_rl_figures(bt, tmp_path, capsys) -> None:
    code = bt.main(["--run-dir", str(tmp_path), "--train-tasks", "24", "--eval-tasks", "6",
                    "--rm-steps", "4", "--rm-eval-every", "2", "--steps", "2",
                    "--batch-size", "8", "--group-size", "4", "--sft-steps", "5",
                    "--eval-seeds", "8"])
    assert code == 0
    assert len(read_pairs(tmp_path / "pairs" / "train.jsonl")) == 24 * 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    rm, rl = summary["reward_model"], summary["rl"]
    assert [row["step"] for row in rm["history"]] == [0, 2, 4]
    assert set(rm["eval_accuracy_by_kind"]) == {"near", "far", "format"}
    assert rl["steps"] == 2 and 0.0 <= rl["heldout_exact_match_final"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text()
            .splitlines()]
    # the reward model scored every training episode: its per-step metrics are logged
    assert [r["reward_model/scored"] for r in rows if "reward_model/scored" in r] == [8.0, 8.0]
    assert "RL with the reward model only" in capsys.readouterr().out


def test_hard_negatives_are_distinct_near_misses_per_task(bt) -> None:
    by_kind = bt.make_pairs(range(10), seed=0, num_near=3)
    assert [len(by_kind[k]) for k in bt.KINDS] == [30, 10, 10]
    for i in range(10):
        rejected = {p.rejected for p in by_kind["near"][3 * i: 3 * i + 3]}
        answer = int(by_kind["near"][3 * i].chosen.removeprefix("Answer: "))
        assert len(rejected) == 3
        assert all(1 <= abs(int(r.removeprefix("Answer: ")) - answer) <= 3 for r in rejected)
    with pytest.raises(ValueError, match="num_near=7: there are 6 near misses"):
        bt.make_pairs(range(1), num_near=7)


def test_the_rl_run_anchors_the_policy_with_a_kl_penalty(bt, tmp_path) -> None:
    args = bt.parse_args(["--run-dir", str(tmp_path), "--kl-coef", "0.1"])
    trainer = bt.make_trainer(args, lambda episode: 0.0)  # any reward fn: no model loaded
    assert trainer.policies["solver"].algorithm_params == {"kl_coef": 0.1}
    assert bt.parse_args([]).kl_coef == 0.0  # the old, unanchored run stays reproducible


def test_sft_initialised_reward_model_takes_the_policy_backbone(bt, tmp_path) -> None:
    import torch

    from areal_agents.rewards.reward_model import RewardModel

    args = bt.parse_args(["--run-dir", str(tmp_path), "--rm-init", "sft", "--rm-sft-steps", "2",
                          "--train-tasks", "8"])
    rm = bt.sft_initialised_rm(args)
    fresh = RewardModel.from_pretrained("tiny:xs", seed=args.seed)
    # a new score head (as from_pretrained), but a backbone trained away from the fresh one
    assert torch.equal(rm.model.score.weight, fresh.model.score.weight)
    assert not torch.equal(rm.model.model.layers[0].mlp.up_proj.weight,
                           fresh.model.model.layers[0].mlp.up_proj.weight)


# ---- round 4: pairs from the policy's own answers, the format gate, the exact-match arm ----


def _answer(bt, task_seed: int, reply: str):
    """An (episode, is_correct) as the policy would give it for ``task_seed``."""
    import numpy as np

    from areal_agents.envs.arithmetic import make_task, prompt
    from areal_agents.episode import Episode

    question, answer = make_task(np.random.default_rng(task_seed), **bt.ENV_KWARGS)
    ok = score(reply, answer)[0] == 1.0
    episode = Episode(["agent"], {"agent": [{"role": "user", "content": prompt(question)},
                                            {"role": "assistant", "content": reply},
                                            {"role": "user", "content": "Correct." if ok
                                             else "Wrong."}]},
                      {}, {"agent": float(ok)}, 1, "terminated", seed=task_seed)
    return episode, ok, answer


def test_policy_pairs_are_distinct_right_vs_wrong_per_question(bt) -> None:
    import numpy as np

    from areal_agents.envs.arithmetic import make_task

    # two task seeds with the same question: their samples are pooled
    q0 = make_task(np.random.default_rng(0), **bt.ENV_KWARGS)[0]
    twin = next(s for s in range(1, 5000)
                if make_task(np.random.default_rng(s), **bt.ENV_KWARGS)[0] == q0)
    answer = make_task(np.random.default_rng(0), **bt.ENV_KWARGS)[1]
    replies = [(0, f"Answer: {answer}"), (0, f"Answer: {answer + 1}"),
               (twin, f"Answer: {answer + 1}"), (twin, f"Answer: {answer}"),
               (twin, f"Answer: {answer - 2}"), (twin, f"I think {answer}")]
    answers = [_answer(bt, s, r)[:2] for s, r in replies]
    pairs = bt.policy_pairs(answers)
    assert sorted((p.chosen, p.rejected) for p in pairs) == sorted(
        (f"Answer: {answer}", r) for r in
        (f"Answer: {answer + 1}", f"Answer: {answer - 2}", f"I think {answer}"))
    assert all(p.prompt[-1]["content"] == answers[0][0].messages["agent"][0]["content"]
               for p in pairs)
    # held-out pairs leave out those already trained on
    held = bt.policy_pairs(answers, exclude={bt.key(p) for p in pairs[:2]})
    assert [bt.key(p) for p in held] == [bt.key(p) for p in pairs[2:]]


class _ScoreByReply:
    """A stand-in reward model: the score of a reply is looked up by its text."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def score(self, prompts, responses, batch_size: int = 32) -> list[float]:
        return [self.table[r] for r in responses]


def test_same_question_auc_weighs_samples_as_the_policy_gives_them(bt) -> None:
    _, _, answer = _answer(bt, 0, "")
    right, near, far = f"Answer: {answer}", f"Answer: {answer + 1}", f"Answer: {answer + 9}"
    answers = [_answer(bt, 0, r)[:2] for r in (right, near, near, near, far)]
    answers.append(_answer(bt, 1, f"Answer: {_answer(bt, 1, '')[2]}")[:2])  # all right: no pair
    rm = _ScoreByReply({right: 1.0, near: 2.0, far: 0.0})
    # 4 (right, wrong) sample pairs of seed 0's question: the near miss (3 samples) wins, far loses
    assert bt.same_prompt_auc(rm, answers) == {"auc": 0.25, "questions": 1.0,
                                               "sample_pairs": 4.0}
    rm.table[near] = 1.0  # ties count a half
    assert bt.same_prompt_auc(rm, answers)["auc"] == (3 * 0.5 + 1) / 4


async def test_the_format_gate_gives_unformatted_replies_the_floor(bt) -> None:
    from areal_agents.rewards.reward_model import RewardModel

    rm = RewardModel.from_pretrained("tiny:xs")
    args = bt.parse_args(["--gate", "--gate-floor", "-5", "--normalize", "sigmoid"])
    reward = bt.make_reward(args, rm)
    good, _, answer = _answer(bt, 0, "Answer: 3")
    bad, _, _ = _answer(bt, 0, f"I think {answer}")
    r_good, r_bad = await reward(good), await reward(bad)
    assert 0.0 < r_good["agent"] < 1.0 and r_bad == {"agent": -5.0}
    assert reward.num_gated == 1 and reward.num_scored == 2  # the model still scored it
    assert [r["agent"] for r in reward.score_episodes([good, bad])] == [r_good["agent"], -5.0]
    assert type(bt.make_reward(bt.parse_args([]), rm)).__name__ == "RewardModelReward"


def test_the_exact_match_arm_trains_on_the_env_reward(bt, tmp_path) -> None:
    args = bt.parse_args(["--run-dir", str(tmp_path), "--reward", "exact"])
    trainer = bt.make_trainer(args, None)
    assert trainer.reward_fns == []
    assert not isinstance(trainer.make_env(), bt.RewardFreeArithmetic)
    assert isinstance(bt.make_trainer(args, lambda e: {"agent": 0.0}).make_env(),
                      bt.RewardFreeArithmetic)


@pytest.mark.slow
def test_tiny_run_with_policy_pairs_gate_and_an_rm_refresh(bt, tmp_path, capsys) -> None:
    code = bt.main(["--run-dir", str(tmp_path), "--train-tasks", "24", "--eval-tasks", "6",
                    "--rm-steps", "4", "--rm-eval-every", "2", "--steps", "4",
                    "--batch-size", "8", "--group-size", "4", "--sft-steps", "60",
                    "--eval-seeds", "8", "--policy-seeds", "20", "--policy-samples", "4",
                    "--policy-eval-seeds", "10", "--gate", "--normalize", "running",
                    "--clip", "3", "--rm-rounds", "2", "--rm-refresh-steps", "2"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    stats = summary["reward_model"]["policy_data"]
    assert stats["train_answers"] == 80 and stats["held_out_answers"] == 40
    train = read_pairs(tmp_path / "pairs" / "train.jsonl")
    assert len(train) == 24 * 3 + stats["train_pairs"]
    for p in train[24 * 3:]:  # the policy's pairs: a right answer over a wrong one
        question = p.prompt[-1]["content"].splitlines()[-1].removesuffix(" = ?")
        a, op, b = question.split()  # "a + b" / "a - b" of one-digit numbers
        answer = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert score(p.chosen, answer)[0] == 1.0 and score(p.rejected, answer)[0] == 0.0
    rl = summary["rl"]
    assert rl["steps"] == 4 and len(rl["rm_refreshes"]) == 1
    assert rl["rm_refreshes"][0]["step"] == 2 and rl["rm_refreshes"][0]["answers"] == 80
    assert all(-3.0 <= r <= 3.0 for r in rl["train_reward_windows"])  # clipped at 3
    assert "same-question ranking" in capsys.readouterr().out
