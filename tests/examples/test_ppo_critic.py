"""examples/ppo_critic: the compare script at tiny size (two steps per arm) and its arms."""

from __future__ import annotations

import json

import pytest

from areal_agents.algorithms import GRPO, PPO
from areal_agents.errors import ConfigError
from areal_agents.trainers.critic import CriticSpec

from ._load import load_example

compare = load_example("ppo_critic", "compare")


def test_listener_decodes_the_digit_as_a_letter():
    assert compare.decode_listener([{"role": "user", "content": "items...\nmessage: 2"}]) == "C"
    assert compare.decode_listener("message: x") == "A"


def test_arms_differ_only_in_algorithm_group_size_and_critic():
    grpo = compare.build("grpo", batch_size=8, group_size=4)
    ppo_critic = compare.build("ppo_critic", batch_size=8, group_size=4)
    ppo = compare.build("ppo", batch_size=8, group_size=4)
    assert isinstance(grpo.algorithm, GRPO) and grpo.group_size == 4
    assert isinstance(ppo_critic.algorithm, PPO) and ppo_critic.group_size == 1
    assert ppo_critic.policies["speaker"].critic is not None
    assert ppo.policies["speaker"].critic is None and ppo.group_size == 1
    assert grpo.batch_size == ppo_critic.batch_size == ppo.batch_size == 8  # equal episodes
    with pytest.raises(ValueError, match="unknown arm 'a2c'"):
        compare.build("a2c")
    listener = compare.ScriptedAgent(compare.decode_listener)
    with pytest.raises(ConfigError, match="group_size=1 makes every advantage 0"):
        compare.Trainer(env="Signaling-v0", policies={"s": compare.Policy()},  # why GRPO
                        policy_map={"speaker": "s"}, agents={"listener": listener},  # needs groups
                        algorithm=GRPO(), batch_size=4, group_size=1)


def test_critic_and_regularisation_flags_reach_the_arms():
    kw = {"critic_lr": 3e-3, "critic_updates": 2, "critic_warmup": 5, "kl_coef": 0.05,
          "entropy_coef": 0.01}
    ppo_critic, grpo = compare.build("ppo_critic", **kw), compare.build("grpo", **kw)
    assert ppo_critic.policies["speaker"].critic == CriticSpec(
        lr=3e-3, num_updates=2, warmup_steps=5)
    assert grpo.policies["speaker"].critic is None  # the critic's flags are its arm's alone
    for trainer in (ppo_critic, grpo):  # the KL and entropy terms are every arm's
        assert trainer.algorithm.kl_coef == 0.05 and trainer.algorithm.entropy_coef == 0.01


def test_compare_runs_at_tiny_size(tmp_path, capsys):
    code = compare.main(["--steps", "2", "--arms", "ppo_critic,grpo", "--batch-size", "4",
                         "--group-size", "2", "--rounds", "2", "--sft-steps", "2",
                         "--eval-seeds", "2", "--run-dir", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["arm"] for r in results] == ["ppo_critic", "grpo"]
    for r in results:
        assert r["episodes"] == 8 and len(r["reward"]) == 2
        assert 0 <= r["eval_before"] <= 1 and 0 <= r["eval_final"] <= 1
    assert len(results[0]["explained_variance"]) == 2 and results[1]["explained_variance"] == []
    out = capsys.readouterr().out
    assert "ppo_critic group_size 1, 8 episodes" in out and "critic EV" in out
    assert "grpo       group_size 2, 8 episodes" in out


def test_yaml_config_builds_one_critic_per_policy(tmp_path):
    from areal_agents.config import load_config
    from areal_agents.trainers.critic import CriticSpec

    cfg = load_config(compare.__file__.replace("compare.py", "signaling_ppo_critic.yaml"),
                      [f"run_dir={tmp_path}", "trainer.steps=1"])
    trainer = cfg.build()
    assert isinstance(trainer.algorithm, PPO) and trainer.group_size == 1
    assert trainer.policies["speaker"].critic == CriticSpec(lr=1e-3)
    assert trainer.policies["listener"].critic == CriticSpec(lr=1e-3, backend="archon")
