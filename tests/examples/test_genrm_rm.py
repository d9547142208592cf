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
