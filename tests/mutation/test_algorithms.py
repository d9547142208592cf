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
