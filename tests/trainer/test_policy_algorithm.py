"""Per-policy algorithm overrides: one role gets its own loss settings (e.g. a KL penalty)."""

from __future__ import annotations

import pytest

from areal_agents.algorithms import GRPO
from areal_agents.config import apply_overrides, parse_config
from areal_agents.errors import ConfigError
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

SAMPLING = {"temperature": 1.0, "max_tokens": 1}


def make(speaker_params, **kw):
    return Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"s": Policy(lr=3e-3, sampling=SAMPLING, api="completions",
                              algorithm_params=speaker_params),
                  "l": Policy(lr=3e-3, seed=1, sampling=SAMPLING, api="completions")},
        policy_map={"speaker": "s", "listener": "l"}, algorithm=GRPO(clip_eps=0.2),
        batch_size=8, group_size=4, progress=False, **kw)


def test_override_gives_that_policy_its_own_algorithm_object():
    trainer = make({"kl_coef": 0.05, "entropy_coef": 0.01})
    s, listener = trainer.algorithms["s"], trainer.algorithms["l"]
    assert listener is trainer.algorithm and s is not trainer.algorithm
    assert (s.kl_coef, s.entropy_coef, s.clip_eps) == (0.05, 0.01, 0.2)
    assert (listener.kl_coef, listener.entropy_coef) == (0.0, 0.0)
    assert s.needs_reference and not listener.needs_reference


def test_unknown_override_names_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"policies\.s\.algorithm_params.*\['kl_cof'\].*kl_coef"):
        make({"kl_cof": 0.1})


def test_yaml_override_reaches_the_policy():
    data = apply_overrides({"env": "Signaling-v0", "policies": {"s": {}, "l": {}},
                            "policy_map": {"speaker": "s", "listener": "l"}},
                           ["policies.s.algorithm_params.kl_coef=0.02"])
    cfg = parse_config(data)
    assert cfg.policies["s"].algorithm_params == {"kl_coef": 0.02}
    assert cfg.policies["l"].algorithm_params == {}


async def test_only_the_overridden_policy_trains_with_a_reference():
    trainer = make({"kl_coef": 0.5})
    try:
        await trainer.setup()
        assert set(trainer.ref_engines) == {"s"}
        history = await trainer.afit(2)
    finally:
        await trainer.aclose()
    assert len(history) == 2 and history[-1]["policy/s/version"] == 2
    assert all(abs(h.get("policy/l/kl", 0.0)) == 0.0 for h in history)
    assert all("policy/s/kl" in h for h in history)


async def test_partial_groups_reaches_the_controller_and_is_validated(tmp_path):
    data = apply_overrides({"env": "Signaling-v0", "env_kwargs": {"num_items": 2, "pool_size": 2},
                            "policies": {"s": {"api": "completions"}, "l": {"api": "completions"}},
                            "policy_map": {"speaker": "s", "listener": "l"},
                            "trainer": {"batch_size": 8, "group_size": 4},
                            "run_dir": str(tmp_path), "logging": {"progress": False}},
                           ["trainer.partial_groups=2"])
    trainer = parse_config(data).build()
    try:
        await trainer.setup()
        assert trainer.controller.partial_groups == 2
    finally:
        await trainer.aclose()
    with pytest.raises(ConfigError, match=r"partial_groups must be in 0\.\.group_size=4"):
        make({}, partial_groups=5)
