"""One backend registry: a registered backend is accepted by Policy, YAML configs and the Trainer."""

from __future__ import annotations

import pytest

from areal_agents.config import parse_config
from areal_agents.errors import ConfigError
from areal_agents.trainers import backends
from areal_agents.trainers.backends import backend_factory, check_backend, register_backend
from areal_agents.trainers.fsdp.engine import FSDPEngine
from areal_agents.trainers.policy import Policy


class MineEngine(FSDPEngine):
    """A custom backend: the FSDP engine under another name (what a user would register)."""


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test."""
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    return backends.BACKENDS


def _config(backend: str, tmp_path) -> dict:
    return {"env": "Signaling-v0", "env_kwargs": {"num_items": 2, "pool_size": 2},
            "policies": {"s": {"backend": backend, "api": "completions"},
                         "l": {"api": "completions", "seed": 1}},
            "policy_map": {"speaker": "s", "listener": "l"},
            "trainer": {"batch_size": 4, "group_size": 4},
            "run_dir": str(tmp_path), "logging": {"progress": False, "tensorboard": False}}


def test_unknown_backend_lists_registered_names_and_how_to_register(registry):
    with pytest.raises(ConfigError, match=r"^Policy\.backend='mine': unknown backend 'mine'; "
                       r"registered: \['fsdp', 'archon', 'megatron'\]; register another with "
                       r"areal_agents\.trainers\.backends\.register_backend\(name, "):
        Policy(backend="mine")
    with pytest.raises(ConfigError, match=r"policies\.s\.backend.*unknown backend 'mine'.*"
                       r"register_backend"):
        parse_config(_config("mine", "runs/x"))


@pytest.mark.parametrize("factory", [MineEngine, f"{__name__}:MineEngine"])
async def test_registered_backend_is_accepted_everywhere_and_built(registry, factory, tmp_path):
    register_backend("mine", factory)
    assert check_backend("mine") == "mine" and backend_factory("mine") is MineEngine
    assert Policy(backend="mine").backend == "mine"
    trainer = parse_config(_config("mine", tmp_path)).build()
    try:
        await trainer.setup()
        assert type(trainer.train_engines["s"]) is MineEngine
        assert type(trainer.train_engines["l"]) is FSDPEngine
    finally:
        await trainer.aclose()


def test_register_backend_rejects_malformed_factories(registry):
    with pytest.raises(TypeError, match=r"'package\.module:EngineClass'"):
        register_backend("mine", "no_colon")
    with pytest.raises(TypeError, match="must be a 'module:attr' string or a callable, got int"):
        register_backend("mine", 3)
    assert "mine" not in registry
