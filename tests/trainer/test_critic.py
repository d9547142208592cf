"""PPO with a learned critic: value alignment, GAE with learned values, the value loss, the
explained variance, Trainer runs on fsdp and archon, checkpoint round trip, config errors."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from areal_agents.algorithms import GRPO, PPO
from areal_agents.algorithms.advantages import gae, terminal_rewards
from areal_agents.config import parse_config
from areal_agents.errors import ConfigError
from areal_agents.models import tiny
from areal_agents.samples import Sample, collate
from areal_agents.trainers.critic import CriticEngine, CriticSpec, explained_variance
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer


@pytest.fixture(scope="module")
def model():
    return tiny("xs", seed=3)[0]


def hand_samples():
    """Two multi-turn rows of different lengths: prompt, turn, observation, turn."""
    return [
        Sample([5, 6, 7, 8, 9, 10, 11], [0, 0, 1, 1, 0, 1, 1], [0.0] * 7, [-1, -1, 0, 0, -1, 0, 0],
               reward=1.0, group="a"),
        Sample([5, 6, 12, 13], [0, 0, 1, 1], [0.0] * 4, [-1, -1, 0, 0], reward=0.0, group="b"),
    ]


@pytest.mark.parametrize("backend", ["fsdp", "archon"])
def test_values_are_read_before_each_token_like_logprobs(model, backend):
    critic = CriticEngine(model, backend=backend, lr=1e-3)
    with torch.no_grad():
        critic.module.head.weight.normal_()
        critic.module.head.bias.fill_(0.5)
    batch = collate(hand_samples())
    values = critic.values(batch)
    assert values.shape == batch.input_ids.shape == (2, 7)
    # by hand: V[t] = head(h[t-1]) of the HF backbone run on each row alone (no padding)
    for row, s in enumerate(hand_samples()):
        ids = torch.tensor([s.token_ids])
        with torch.no_grad():
            h = model.model(input_ids=ids).last_hidden_state[0]  # [n, H]
            expected = critic.module.head(h).squeeze(-1)  # value after token t
        n = len(s)
        assert values[row, 0] == 0  # nothing read yet (as logprobs[0])
        torch.testing.assert_close(values[row, 1:n], expected[: n - 1], atol=2e-5, rtol=1e-4)
        assert torch.all(values[row, n:] == 0)  # padding


def test_gae_with_learned_values_by_hand():
    # row: generated positions 1, 2 then observation 3, generated 4; reward 1 at the end
    mask = torch.tensor([[0.0, 1, 1, 0, 1]])
    values = torch.tensor([[9.0, 0.5, 0.25, 7.0, 0.75]])  # off-mask values are never read
    adv, ret = gae(terminal_rewards(torch.tensor([1.0]), mask), values, mask,
                   gamma=0.9, gae_lambda=0.5)
    d4 = 1.0 - 0.75  # last token: r + 0 - V
    d2 = 0.0 + 0.9 * 0.75 - 0.25  # the observation position 3 is skipped
    d1 = 0.0 + 0.9 * 0.25 - 0.5
    a4, a2 = d4, d2 + 0.45 * d4
    a1 = d1 + 0.45 * a2
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, a2, 0.0, a4]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.25, 0.0, a4 + 0.75]]))
    # PPO.prepare takes the same path from batch.values
    s = [Sample([1, 2, 3, 4, 5], [0, 1, 1, 0, 1], [0.0] * 5, [-1, 0, 0, -1, 0], reward=1.0)]
    batch = collate(s)
    batch.values = values
    prepared = PPO(gamma=0.9, gae_lambda=0.5, adv_norm=False).prepare(batch, s)
    torch.testing.assert_close(prepared.advantages, adv)
    torch.testing.assert_close(prepared.returns, ret)


def test_explained_variance_formula():
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    r = torch.tensor([[1.0, 2.0, 6.0, 100.0]])
    v = torch.tensor([[1.5, 2.0, 5.0, -3.0]])
    res = torch.tensor([-0.5, 0.0, 1.0])
    expected = 1 - res.var(unbiased=False) / torch.tensor([1.0, 2.0, 6.0]).var(unbiased=False)
    assert explained_variance(v, r, m) == pytest.approx(float(expected))
    assert explained_variance(r, r, m) == 1.0
    assert explained_variance(torch.zeros_like(r) + 3, r, m) == pytest.approx(0.0)
    assert math.isnan(explained_variance(v, torch.ones_like(r), m))  # returns without spread


def test_value_loss_decreases_on_a_fixed_batch(model):
    critic = CriticEngine(model, lr=1e-3, num_updates=1)
    samples = hand_samples()
    algo = PPO(gamma=1.0, gae_lambda=1.0, value_clip_eps=None)
    losses, evs = [], []
    for _ in range(8):
        batch = collate(samples)
        batch.values = critic.values(batch)
        prepared = algo.prepare(batch, samples)
        metrics = critic.update(prepared, algo)
        losses.append(metrics["value_loss"])
        evs.append(metrics["explained_variance"])
    assert losses[0] == pytest.approx(0.5 * 4 / 6, rel=1e-5)  # V = 0; R = 1 on 4 of 6 tokens
    assert losses[-1] < 0.3 * losses[0], losses
    # both rows share the prompt [5, 6], so V at position 2 cannot tell R = 1 from R = 0
    assert evs[0] == pytest.approx(0.0) and evs[-1] > 0.2, evs


def test_value_clip_limits_the_move_and_is_counted(model):
    critic = CriticEngine(model, lr=1e-3)
    samples = hand_samples()
    algo = PPO(value_clip_eps=0.2)
    batch = collate(samples)
    batch.values = critic.values(batch)
    prepared = algo.prepare(batch, samples)
    prepared.values = prepared.values - 1.0  # old values far below the returns
    metrics = critic.update(prepared, algo)
    assert metrics["value_clipfrac"] > 0


def odd_reply(episode):
    """1 when the agent's last reply has an odd length: rewards vary for an untrained model."""
    said = [m for m in episode.messages["agent"] if m.get("role") == "assistant"]
    return {"agent": float(len(said[-1].get("content") or "") % 2)}


def make(run_dir=None, backend="fsdp", critic=None, resume=False, **kw):
    critic = {"lr": 1e-3} if critic is None else critic
    return Trainer(
        env="GuessNumber-v0", env_kwargs={"low": 1, "high": 4, "max_guesses": 2},
        policies={"p": Policy(lr=1e-3, backend=backend, critic=critic,
                              sampling={"temperature": 1.0, "max_tokens": 2},
                              api="completions")},
        policy_map={"agent": "p"}, algorithm="ppo", batch_size=4, group_size=1,
        reward_fns=[odd_reply], run_dir=run_dir, resume=resume, progress=False, **kw)


@pytest.mark.parametrize("backend", ["fsdp", "archon"])
async def test_trainer_logs_critic_metrics(backend):
    trainer = make(backend=backend)
    try:
        history = await trainer.afit(2)
        head = trainer.critics["p"].module.head.weight.detach().clone()
    finally:
        await trainer.aclose()
    for h in history:
        for k in ("value_loss", "explained_variance", "value_mean", "value_clipfrac"):
            assert f"critic/p/{k}" in h, sorted(h)
    assert history[0]["critic/p/value_mean"] == 0.0  # the zero-initialised head
    assert history[0]["critic/p/value_loss"] > 0  # the rewards vary
    assert torch.any(head != 0)  # and the critic learnt from them


async def test_checkpoint_round_trip_restores_the_critic(tmp_path):
    trainer = make(tmp_path, checkpoint_every=1)
    try:
        await trainer.afit(2)
        saved = {k: v.clone() for k, v in trainer.critics["p"].module.state_dict().items()}
        step = trainer.critics["p"].step
    finally:
        await trainer.aclose()
    assert (tmp_path / "checkpoints" / "step_2" / "critics" / "p" / "critic.pt").exists()
    resumed = make(tmp_path, resume=True)
    try:
        await resumed.setup()
        restored = resumed.critics["p"]
        assert restored.step == step == 2
        for k, v in restored.module.state_dict().items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
        assert any(not torch.equal(v, saved[k]) for k, v in
                   CriticEngine(tiny("xs")[0]).module.state_dict().items())  # not by chance
        history = await resumed.afit(3)
    finally:
        await resumed.aclose()
    assert history[-1]["step"] == 3 and "critic/p/value_loss" in history[-1]


def test_multi_agent_runs_one_critic_per_trainable_policy():
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"s": Policy(lr=1e-3, critic={"lr": 1e-3}, api="completions",
                              sampling={"temperature": 1.0, "max_tokens": 1}),
                  "l": Policy(lr=1e-3, critic={"lr": 1e-3}, api="completions",
                              sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "s", "listener": "l"}, algorithm="ppo", batch_size=2,
        group_size=1, progress=False)
    try:
        history = trainer.fit(1)
        assert sorted(trainer.critics) == ["l", "s"]
        assert trainer.critics["l"].module is not trainer.critics["s"].module
    finally:
        asyncio.run(trainer.aclose())
    assert {"critic/s/value_loss", "critic/l/value_loss"} <= set(history[0])


def test_a_critic_without_ppo_is_refused():
    with pytest.raises(ConfigError, match=r"policies.p.critic needs algorithm='ppo'"):
        Trainer(env="GuessNumber-v0", policies={"p": Policy(critic={})},
                policy_map={"agent": "p"}, algorithm=GRPO(), batch_size=2, group_size=2)


def test_worker_group_critic_is_refused_by_name():
    with pytest.raises(ConfigError, match="not implemented for worker-group policies"):
        Policy(critic={"lr": 1e-3}, train={"world_size": 2})


def test_critic_spec_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"Policy.critic: unknown field\(s\) \['lrr'\]"):
        Policy(critic={"lrr": 1e-3})
    with pytest.raises(ConfigError, match="critics run on"):
        CriticSpec(backend="megatron")
    with pytest.raises(ConfigError, match="a critic cannot run on backend 'megatron'"):
        Policy(backend="megatron", critic={})


def test_yaml_config_loads_the_critic():
    cfg = parse_config({
        "env": "GuessNumber-v0", "policy_map": {"agent": "p"},
        "policies": {"p": {"critic": {"lr": 1e-4, "num_updates": 2, "backend": "archon"}}},
        "algorithm": {"name": "ppo", "params": {"gamma": 1.0, "gae_lambda": 0.9}},
        "trainer": {"group_size": 1, "batch_size": 2},
    })
    trainer = cfg.build()
    assert trainer.policies["p"].critic == CriticSpec(lr=1e-4, num_updates=2, backend="archon")
    with pytest.raises(ConfigError, match="num_updates must be >= 1"):
        parse_config({"env": "GuessNumber-v0", "policy_map": {"agent": "p"},
                      "policies": {"p": {"critic": {"num_updates": 0}}}})


def weights(trainer, name="p"):
    return {k: v.detach().clone() for k, v in trainer.train_engines[name].export_weights()}


@pytest.mark.slow
async def test_critic_warmup_trains_the_critic_alone_then_both():
    trainer = make(critic={"lr": 1e-3, "warmup_steps": 2})
    try:
        await trainer.setup()
        start = weights(trainer)
        await trainer.afit(2)
        held, engine_step = weights(trainer), trainer.train_engines["p"].step
        head = trainer.critics["p"].module.head.weight.detach().clone()
        history = await trainer.afit(3)  # the whole run's metrics
        after, critic_steps = weights(trainer), trainer.critics["p"].step
    finally:
        await trainer.aclose()
    assert [h["critic/p/warmup"] for h in history] == [1.0, 1.0, 0.0]
    assert engine_step == 0  # no policy optimizer step during the warm-up
    for k, v in held.items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0)
    assert torch.any(head != 0)  # the critic learnt meanwhile
    assert "policy/p/loss" not in history[0] and "policy/p/loss" in history[2]
    assert any(not torch.equal(v, held[k]) for k, v in after.items())  # step 3 trains it
    assert critic_steps == 3


def test_critic_warmup_counts_batches_not_optimizer_steps(model):
    critic = CriticEngine(model, lr=1e-3, num_updates=2, warmup_steps=1)
    batch = PPO().prepare(collate(hand_samples()), hand_samples())
    batch.values = critic.values(batch)
    assert critic.warming_up
    assert critic.update(batch, PPO())["warmup"] == 1.0
    assert critic.step == 2 and not critic.warming_up


def test_yaml_config_sets_critic_warmup_steps():
    cfg = parse_config({
        "env": "GuessNumber-v0", "policy_map": {"agent": "p"},
        "policies": {"p": {"critic": {"lr": 1e-4, "warmup_steps": 5}}},
        "algorithm": {"name": "ppo"}, "trainer": {"group_size": 1, "batch_size": 2},
    })
    assert cfg.build().policies["p"].critic == CriticSpec(lr=1e-4, warmup_steps=5)
    assert Policy(critic=CriticSpec(warmup_steps=5)).critic.warmup_steps == 5
    with pytest.raises(ConfigError, match=r"policies.p.critic: .*warmup_steps must be >= 0, got -1"):
        parse_config({"env": "GuessNumber-v0", "policy_map": {"agent": "p"},
                      "policies": {"p": {"critic": {"warmup_steps": -1}}}})
