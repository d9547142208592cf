"""Algorithm details the mutation run found untested (exact messages, edge cases); the
numerical behaviour is tested in tests/algorithms."""

from __future__ import annotations

import pytest

from areal_agents.algorithms.registry import ALGORITHMS, check_algorithm, resolve


def test_registry_messages():
    assert check_algorithm("grpo") == "grpo"
    with pytest.raises(ValueError) as info:
        check_algorithm("GRPO")  # configs spell names exactly
    assert str(info.value) == f"unknown algorithm 'GRPO'; allowed: {list(ALGORITHMS)}"
    with pytest.raises(ValueError) as info:
        resolve("nope")
    assert str(info.value) == f"unknown algorithm 'nope'; allowed: {list(ALGORITHMS)}"
    algo = resolve("GrPo")
    with pytest.raises(ValueError) as info:
        resolve(algo, kl_coef=0.1, clip_eps=0.2)
    assert str(info.value) == (f"got an algorithm object ({type(algo).__name__}) and arguments "
                               "['clip_eps', 'kl_coef']; set them on the object instead")


def test_state_dict_round_trip_and_unknown_keys():
    algo = resolve("grpo")
    algo.ema_baselines = {"a": 0.5}
    state = algo.state_dict()
    assert state == {"ema_baselines": {"a": 0.5}}
    state["ema_baselines"]["a"] = 9.0  # a copy: the algorithm's state is not aliased
    assert algo.ema_baselines == {"a": 0.5}
    other = resolve("dapo")
    other.ema_baselines = {"old": 1.0}
    other.load_state_dict({"ema_baselines": {"b": 1, 2: "0.25"}})
    assert other.ema_baselines == {"b": 1.0, "2": 0.25}
    assert all(type(v) is float for v in other.ema_baselines.values())
    other.load_state_dict({})  # a missing entry means empty
    assert other.ema_baselines == {}
    with pytest.raises(ValueError) as info:
        other.load_state_dict({"ema_baselines": {}, "zeta": 1, "alpha": 2})
    assert str(info.value) == ("DAPO.load_state_dict: unknown keys ['alpha', 'zeta']; "
                               "expected only 'ema_baselines'")
