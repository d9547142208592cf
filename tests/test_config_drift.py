"""The YAML config cannot drift from the code: ``PolicyConfig`` mirrors the ``Policy`` dataclass,
``TrainerConfig`` + ``RunConfig`` mirror ``Trainer.__init__`` (names, defaults, and ``build``
passes every field)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
from pydantic import BaseModel

from areal_agents.config import PolicyConfig, RunConfig, TrainerConfig
from areal_agents.trainers import trainer as trainer_module
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

# Trainer arguments with no config field, on purpose.
TRAINER_ONLY = {
    "agents",  # fixed Agent objects (Python code, not YAML)
    "group_reward_fns",  # built from reward_fns entries of a group type (group_judge)
    "logger",  # built by RunConfig.build from the `logging` section
    "progress",  # logging.progress (a logging setting, not a trainer one)
}
# Config fields with no Trainer argument, on purpose.
CONFIG_ONLY = {
    "steps",  # the argument of Trainer.fit, given by `areal-agents train`
    "session_idle_timeout_s",  # an ExternalTrainer argument, set by `serve --train`
    "external_batch_size",  # an ExternalTrainer argument (a mixed run), set by `serve --train`
    "trainer", "logging",  # sections of RunConfig, not Trainer arguments
}
# Deliberately different defaults: name -> (Trainer default, config default).
DEFAULTS_DIFFER = {
    "run_dir": (None, "runs/run"),  # a CLI run always writes somewhere; the API may not
    "env_kwargs": (None, {}),  # the same: Trainer treats None as {} (no mutable default)
    "reward_fns": (None, []),  # specs ({type: ...}) in the config, callables in the Trainer
}
# Shared names whose config value is a section: name -> how to read its default from it.
SECTIONS = {"algorithm": lambda section: section.name}  # AlgorithmConfig(name, params)


REQUIRED = object()


def _config_defaults(model: type[BaseModel]) -> dict[str, Any]:
    return {name: REQUIRED if f.is_required() else
            f.default_factory() if f.default_factory is not None else f.default
            for name, f in model.model_fields.items()}


def _trainer_defaults() -> dict[str, Any]:
    params = inspect.signature(Trainer.__init__).parameters
    return {n: REQUIRED if p.default is inspect.Parameter.empty else p.default
            for n, p in params.items() if n != "self"}


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, range) else value


def test_policy_config_mirrors_the_policy_dataclass():
    policy = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else f.default) for f in dataclasses.fields(Policy)}
    config = _config_defaults(PolicyConfig)
    assert sorted(config) == sorted(policy)
    assert config == policy


def test_trainer_and_run_config_mirror_trainer_init():
    trainer = _trainer_defaults()
    config = {**_config_defaults(TrainerConfig), **_config_defaults(RunConfig)}
    assert sorted(set(trainer) - set(config) - TRAINER_ONLY) == []
    assert sorted(set(config) - set(trainer) - CONFIG_ONLY) == []
    shared = (set(trainer) & set(config)) - set(DEFAULTS_DIFFER) - set(SECTIONS)
    differ = {n: (_normalise(trainer[n]), config[n]) for n in shared
              if _normalise(trainer[n]) != config[n]}  # REQUIRED only equals REQUIRED
    assert differ == {}
    assert {n: (trainer[n], config[n]) for n in DEFAULTS_DIFFER} == DEFAULTS_DIFFER
    assert {n: read(config[n]) for n, read in SECTIONS.items()} == {
        n: trainer[n] for n in SECTIONS}


def test_build_passes_every_field(monkeypatch, tmp_path):
    seen: dict[str, Any] = {}
    monkeypatch.setattr(trainer_module, "Trainer", lambda **kw: seen.update(kw))
    RunConfig(env="Signaling-v0", policies={"a": PolicyConfig()}, policy_map={"speaker": "a"},
              run_dir=str(tmp_path)).build()
    expected = set(_trainer_defaults()) - {"agents"}  # fixed Agent objects: code only
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("name", sorted(TRAINER_ONLY | CONFIG_ONLY | set(DEFAULTS_DIFFER)
                                        | set(SECTIONS)))
def test_allow_lists_name_real_fields(name):
    known = (set(_trainer_defaults()) | set(RunConfig.model_fields)
             | set(TrainerConfig.model_fields))
    assert name in known, f"allow-list entry {name!r} no longer exists; remove it"
