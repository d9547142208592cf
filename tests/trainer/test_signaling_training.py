"""A short real training run: a tiny LLM speaker learns a code a scripted listener decodes."""

from __future__ import annotations

import pytest

from areal_agents.agents import ScriptedAgent
from areal_agents.algorithms import GRPO
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer


def decode_listener(observation):
    """Reads ``message: d`` and picks the d-th letter (A=0): a fixed code the speaker must learn."""
    text = observation[-1]["content"] if isinstance(observation, list) else str(observation)
    message = text.rsplit("message:", 1)[-1].strip()
    return chr(ord("A") + int(message)) if message.isdigit() else "A"


def make_trainer(run_dir=None, **kw) -> Trainer:
    sampling = {"temperature": 1.0, "max_tokens": 1}
    return Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(lr=3e-3, seed=0, sampling=sampling, sft_steps=60,
                                    sft_lr=3e-3, api="completions")},
        policy_map={"speaker": "speaker"},
        agents={"listener": ScriptedAgent(decode_listener)},
        algorithm=GRPO(), batch_size=16, group_size=8, max_staleness=0, progress=False,
        warm_start={"episodes": 32, "players": {"speaker": "random",
                                                "listener": ScriptedAgent(decode_listener)}},
        eval_seeds=range(500, 532), run_dir=run_dir, **kw)


@pytest.mark.slow
async def test_speaker_success_improves_over_initial_policy():
    trainer = make_trainer()
    try:
        await trainer.setup()
        before = (await trainer.evaluate())["eval/speaker/success"]
        history = await trainer.afit(30)
        after = (await trainer.evaluate())["eval/speaker/success"]
    finally:
        await trainer.aclose()
    assert len(history) == 30
    assert history[-1]["policy/speaker/version"] == 30
    assert after > before, (before, after)  # greedy, held-out seeds
    late = [h["train/speaker/success"] for h in history[-5:]]
    early = [h["train/speaker/success"] for h in history[:5]]
    assert sum(late) / 5 >= sum(early) / 5 + 0.1, (early, late)  # sampled, training seeds
