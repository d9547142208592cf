"""Run configs: YAML + overrides, field-naming validation errors, policy_map validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from areal_agents.config import apply_overrides, load_config, parse_config
from areal_agents.errors import ConfigError
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import backend_factory, resolve_policy_map

EXAMPLE = Path(__file__).parents[2] / "examples" / "signaling" / "two_llms.yaml"


def test_example_config_loads_with_overrides():
    cfg = load_config(EXAMPLE, ["trainer.batch_size=128", "policies.speaker.lr=0.01",
                                "algorithm.params.clip_eps=0.1"])
    assert cfg.trainer.batch_size == 128
    assert cfg.policies["speaker"].lr == 0.01 and cfg.policies["listener"].lr == 1e-3
    assert cfg.algorithm.params == {"clip_eps": 0.1, "kl_coef": 0.05}  # override merges
    assert cfg.policy_map == {"speaker": "speaker", "listener": "listener"}


def test_errors_name_field_and_allowed_values():
    base = {"env": "Signaling-v0", "policies": {"a": {}}, "policy_map": {"speaker": "a"}}
    with pytest.raises(ConfigError, match=r"policies\.a\.backend.*\['fsdp', 'archon', 'megatron'\]"):
        parse_config({**base, "policies": {"a": {"backend": "jax"}}})
    with pytest.raises(ConfigError, match=r"trainer\.batch_sise.*unknown field"):
        parse_config({**base, "trainer": {"batch_sise": 3}})
    with pytest.raises(ConfigError, match=r"algorithm\.name.*'grpo'"):
        parse_config({**base, "algorithm": {"name": "sgd"}})
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        apply_overrides({}, ["trainer.steps"])


def test_policy_map_validation_lists_both_sides():
    policies = {"p": Policy(), "q": Policy()}
    agents = ["speaker", "listener"]
    assert resolve_policy_map(lambda a: "p", agents, policies, {}) == {"speaker": "p",
                                                                      "listener": "p"}
    with pytest.raises(ValueError, match=r"missing agents \['listener'\].*possible_agents="
                                         r"\['speaker', 'listener'\]"):
        resolve_policy_map({"speaker": "p"}, agents, policies, {})
    with pytest.raises(ValueError, match=r"unknown agents \['talker'\]"):
        resolve_policy_map({"speaker": "p", "listener": "p", "talker": "p"}, agents, policies, {})
    with pytest.raises(ValueError, match=r"unknown policies \['z'\]"):
        resolve_policy_map({"speaker": "z", "listener": "p"}, agents, policies, {})
    assert resolve_policy_map({"speaker": "q"}, agents, policies, {"listener": object()}) == {
        "speaker": "q"}


def test_policy_and_backend_validation():
    with pytest.raises(ValueError, match=r"backend='tf'.*\['fsdp', 'archon', 'megatron'\]"):
        Policy(backend="tf")
    with pytest.raises(ValueError, match="set frozen=True"):
        Policy(endpoint="http://x/v1")
    with pytest.raises(ConfigError, match=r"unknown backend 'jax'; registered"):
        backend_factory("jax")
    assert backend_factory("fsdp").__name__ == "FSDPEngine"
