"""KL penalty to a frozen reference policy: zero at the start, positive after updates, resumable."""

from __future__ import annotations

import pytest
import torch

from areal_agents.agents import ScriptedAgent
from areal_agents.algorithms import GRPO
from areal_agents.config import parse_config
from areal_agents.errors import ConfigError
from areal_agents.models import tiny
from areal_agents.trainers.checkpointing import reference_path
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer


def listener(observation):
    return "A"


def odd_length(episode):
    """Reward 1 when the speaker's message has an odd length: rewards vary within a group even
    for an untrained model, so the policy moves away from its reference."""
    said = [m for m in episode.messages["speaker"] if m.get("role") == "assistant"]
    return {"speaker": float(len(said[-1].get("content") or "") % 2)}


def make(run_dir, resume=False, kl_coef=0.5):
    return Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(lr=3e-3, sampling={"temperature": 1.0, "max_tokens": 1},
                                    api="completions")},
        reward_fns=[odd_length],
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(listener)},
        algorithm=GRPO(kl_coef=kl_coef, kl_estimator="k3"), batch_size=8, group_size=4,
        checkpoint_every=2, run_dir=run_dir, resume=resume, progress=False)


def weights(engine):
    return {n: t.clone() for n, t in engine.export_weights()}


async def test_kl_is_zero_against_itself_then_positive_and_the_reference_is_frozen(tmp_path):
    trainer = make(tmp_path)
    try:
        await trainer.setup()
        initial = weights(trainer.train_engines["speaker"])
        history = await trainer.afit(4)
        ref = weights(trainer.ref_engines["speaker"])
        trained = weights(trainer.train_engines["speaker"])
    finally:
        await trainer.aclose()
    kls = [h["policy/speaker/kl"] for h in history]
    assert abs(kls[0]) < 1e-6, kls  # step 1 trains the reference itself
    # k3 >= 0 is 0 until an update has moved the policy (zero-variance batches do not), then > 0
    moved = [h["policy/speaker/grad_norm"] > 0 for h in history]
    assert any(moved[:-1]), moved
    for k in range(1, len(kls)):
        assert (kls[k] > 1e-4) == any(moved[:k]), (k, kls, moved)
        assert kls[k] > 1e-4 or abs(kls[k]) < 1e-6
    for name, t in ref.items():
        torch.testing.assert_close(t, initial[name], rtol=0, atol=0)  # the reference is frozen
    assert any(not torch.equal(t, initial[n]) for n, t in trained.items())
    assert reference_path(tmp_path, "speaker").exists()

    resumed = make(tmp_path, resume=True)
    try:
        await resumed.setup()
        assert resumed.step == 4
        for name, t in weights(resumed.ref_engines["speaker"]).items():
            torch.testing.assert_close(t, initial[name], rtol=0, atol=0)
        more = await resumed.afit(5)
    finally:
        await resumed.aclose()
    assert more[-1]["step"] == 5 and more[-1]["policy/speaker/kl"] > 1e-6


async def test_config_with_kl_coef_runs(tmp_path):
    cfg = parse_config({
        "env": "Signaling-v0", "env_kwargs": {"num_items": 2, "pool_size": 2},
        "policies": {"s": {"lr": 1e-3, "sampling": {"temperature": 1.0, "max_tokens": 1}},
                     "l": {"lr": 1e-3, "sampling": {"temperature": 1.0, "max_tokens": 1}}},
        "policy_map": {"speaker": "s", "listener": "l"},
        "algorithm": {"name": "grpo", "params": {"kl_coef": 0.1, "kl_estimator": "k2"}},
        "trainer": {"batch_size": 4, "group_size": 2, "steps": 2},
        "logging": {"progress": False, "tensorboard": False}, "run_dir": str(tmp_path)})
    trainer = cfg.build()
    assert trainer.algorithm.needs_reference
    try:
        history = await trainer.afit(cfg.trainer.steps)
    finally:
        await trainer.aclose()
    assert [h["step"] for h in history] == [1, 2]
    for p in ("s", "l"):
        assert abs(history[0][f"policy/{p}/kl"]) < 1e-6
        assert history[1][f"policy/{p}/kl"] >= 0  # k2 >= 0 (> 0 needs reward variance)
        assert reference_path(tmp_path, p).exists()


async def test_policy_ref_model_is_the_reference(tmp_path):
    def trainer(ref_model, run_dir):
        return Trainer(
            env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
            policies={"speaker": Policy(lr=1e-3, ref_model=ref_model, api="completions",
                                        sampling={"temperature": 1.0, "max_tokens": 1})},
            policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(listener)},
            algorithm=GRPO(kl_coef=0.1), batch_size=4, group_size=2, run_dir=run_dir,
            progress=False)

    first = trainer("tiny:xs:seed=5", tmp_path / "a")
    try:
        history = await first.afit(1)
        ref = weights(first.ref_engines["speaker"])
    finally:
        await first.aclose()
    expected, _ = tiny("xs", seed=5)
    for name, t in expected.state_dict().items():
        if name in ref:
            torch.testing.assert_close(ref[name], t, rtol=0, atol=0)
    assert history[0]["policy/speaker/kl"] > 1e-3  # another model than the policy's seed-0 init

    wrong = trainer("tiny:s", tmp_path / "b")
    try:
        with pytest.raises(ConfigError, match=r"policies\.speaker\.ref_model='tiny:s'.*tokenizer"):
            await wrong.setup()
    finally:
        await wrong.aclose()
