"""Judges inside the Trainer: a frozen judge policy is served though no agent acts with it, its
calls open no session (never trained on), group judges run once per group, metrics are logged."""

from __future__ import annotations

import pytest

from areal_agents.errors import ConfigError
from areal_agents.rewards import GroupJudge, RubricJudge
from areal_agents.testing.openai_mock import OpenAIMock
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

SOLVER = Policy(lr=1e-3, api="completions", sampling={"temperature": 1.0, "max_tokens": 3})


def make(**kwargs) -> Trainer:
    args = dict(env="Arithmetic-v0", env_kwargs={"digits": 1, "operations": "+"},
                policies={"solver": SOLVER}, policy_map={"agent": "solver"}, batch_size=4,
                group_size=2, progress=False)
    return Trainer(**{**args, **kwargs})


async def test_a_frozen_judge_policy_is_served_and_its_calls_are_not_trained_on():
    judge = RubricJudge("Is it right?", policy="judge", api="completions", name="j",
                        scale=(0, 9), on_failure="fallback", fallback=0.0,
                        sampling={"max_tokens": 2})
    trainer = make(policies={"solver": SOLVER, "judge": Policy(frozen=True, seed=1)},
                   reward_fns=[judge])
    try:
        history = await trainer.afit(1)
        served = sorted(trainer.gateway.policies)
        opened = trainer.gateway.ledger.opened
        played = trainer.controller.controls["solver"].submitted
    finally:
        await trainer.aclose()
    assert served == ["judge", "solver"] and "judge" not in trainer.trainable
    step = history[0]
    calls = step["judge/j/calls"] + step["judge/j/cache_hits"]
    assert calls >= 4  # every trained episode was judged
    assert opened == played  # one session per solver episode; judge calls opened none
    assert step["policy/solver/num_samples"] == 4.0
    trained = step["policy/solver/num_samples"] * step["policy/solver/trained_gen_len"]
    assert step["judge/j/tokens_per_trained_token"] == pytest.approx(
        step["judge/j/tokens"] / trained)
    assert step["judge/j/tokens"] > 0


async def test_group_judge_is_called_once_per_group_inside_the_trainer():
    mock = OpenAIMock(["1: 9\n2: 0"])
    judge = GroupJudge(client=mock.async_client(), scale=(0, 9), name="g")
    trainer = make(group_reward_fns=[judge])
    try:
        history = await trainer.afit(1)
        ledger = trainer.controller.ledger["solver"]
    finally:
        await trainer.aclose()
    ended = sum(v for k, v in ledger.items() if k == "trained" or k.startswith("filtered:"))
    assert len(mock.requests) == ended // 2 >= 2
    step = history[0]
    # each group: one member rewarded 1.0 and one 0.0 on top of the env reward (0 or 1)
    assert step["judge/g/mean_score"] == pytest.approx(0.5)
    assert "Candidate 2:" in mock.requests[0]["messages"][0]["content"]


def test_judge_policy_misconfigurations_are_named():
    judge = RubricJudge("r", policy="judge")
    with pytest.raises(ConfigError, match=r"call policies \['judge'\] that are not in"):
        make(reward_fns=[judge])
    with pytest.raises(ConfigError, match=r"judge policies \['judge'\] are trainable"):
        make(policies={"solver": SOLVER, "judge": Policy()}, reward_fns=[judge])
    with pytest.raises(ConfigError, match="set partial_groups=0"):
        make(group_reward_fns=[GroupJudge(client=object())], partial_groups=1)


def test_a_judge_on_an_endpoint_policy_calls_that_server_with_its_model_name():
    from areal_agents.rewards.hooks import RewardHooks

    local, remote = RubricJudge("r", policy="local"), RubricJudge("r", policy="remote")
    policies = {"local": Policy(frozen=True),
                "remote": Policy(endpoint="http://judge.example:8000/v1", model="judge-7b",
                                 frozen=True)}
    hooks = RewardHooks([local, remote], [], policies, [])
    gateway_client = object()
    hooks.bind(gateway_client)
    assert local.backend.client is gateway_client and local.backend.model == "local"
    assert str(remote.backend.client.base_url) == "http://judge.example:8000/v1/"
    assert remote.backend.model == "judge-7b"
