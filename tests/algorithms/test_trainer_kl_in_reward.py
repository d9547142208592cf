"""The trainer computes reference log-probs before ``prepare`` (kl_in_reward reads them)."""

from __future__ import annotations

import areal_agents as aa
from areal_agents.agents import ScriptedAgent


async def test_kl_in_reward_trains_through_the_trainer(tmp_path):
    trainer = aa.Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": aa.Policy(lr=1e-3, api="completions",
                                       sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(lambda obs: "A")},
        algorithm=aa.GRPO(kl_coef=0.1, kl_in_reward=True), batch_size=4, group_size=2,
        run_dir=tmp_path, progress=False)  # fmt: skip
    try:
        history = await trainer.afit(2)  # prepare() before the reference: ValueError
    finally:
        await trainer.aclose()
    assert [h["step"] for h in history] == [1, 2]
    assert abs(history[0]["policy/speaker/kl"]) < 1e-6  # step 1: the policy is its reference
