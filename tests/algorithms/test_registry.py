"""One table of algorithm names: every name builds, the config accepts exactly those names."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.algorithms import ALGORITHMS, PolicyGradient, resolve
from areal_agents.config import AlgorithmConfig, parse_config
from areal_agents.errors import ConfigError
from areal_agents.trainers.stats import resolve_algorithm


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_name_builds_its_class_and_the_config_accepts_it(name):
    algo = resolve(name, kl_coef=0.01)
    assert type(algo) is ALGORITHMS[name] and isinstance(algo, PolicyGradient)
    assert algo.kl_coef == 0.01
    assert type(resolve_algorithm(name.upper())) is ALGORITHMS[name]  # the trainer's entry point
    assert AlgorithmConfig(name=name).name == name
    assert getattr(aa, ALGORITHMS[name].__name__) is ALGORITHMS[name]  # in the flat API


def test_names_cover_the_exported_algorithms():
    exported = {n for n in aa.algorithms.__all__ if isinstance(getattr(aa.algorithms, n), type)}
    assert {c.__name__ for c in ALGORITHMS.values()} == exported - {"PolicyGradient"}


def test_config_rejects_names_outside_the_registry():
    data = {"env": "Signaling-v0", "policies": {"p": {}}, "policy_map": {"speaker": "p"},
            "algorithm": {"name": "grpo2"}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"algorithm\.name: .*unknown algorithm 'grpo2'; "
                       r"allowed: \['grpo', 'drgrpo', 'dapo', 'rloo', 'reinforce\+\+'"):
        parse_config(data)
    with pytest.raises(ValueError, match="unknown algorithm 'GRPO'"):
        AlgorithmConfig(name="GRPO")  # configs spell names exactly


def test_resolve_errors():
    with pytest.raises(ValueError, match=r"unknown algorithm 'nope'; allowed: \['grpo'"):
        resolve("nope")
    algo = aa.GRPO()
    assert resolve(algo) is algo
    with pytest.raises(ValueError, match=r"got an algorithm object \(GRPO\) and arguments"):
        resolve(algo, clip_eps=0.1)
