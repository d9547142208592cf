"""DAPO dynamic sampling and the overlong penalty."""

from __future__ import annotations

import pytest

from areal_agents.algorithms.filtering import (
    drop_zero_variance_groups,
    overlong_penalty,
    shaped_rewards,
)
from areal_agents.samples import Sample


def _s(group, reward, agent="a", n_gen=1):
    return Sample(
        [0] * (n_gen + 1), [0] + [1] * n_gen, [0.0] + [-1.0] * n_gen, [-1] + [0] * n_gen,
        reward=reward, agent=agent, group=group,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (6, 0.0), (7, -0.25), (8, -0.5), (10, -1.0), (11, -1.0), (100, -1.0)],
)
def test_overlong_penalty_by_hand(length, expected):
    # L_max = 10, buffer 4: penalty ramps from 0 at 6 tokens to -1 at 10 tokens
    got = overlong_penalty(length, max_response_len=10, overlong_buffer_len=4)
    assert got == pytest.approx(expected)
    assert overlong_penalty(
        length, max_response_len=10, overlong_buffer_len=4, penalty_factor=2.0
    ) == pytest.approx(2 * expected)


def test_overlong_penalty_rejects_bad_buffer():
    with pytest.raises(
        ValueError, match=r"overlong_buffer_len must be in \(0, max_response_len=4\]"
    ):
        overlong_penalty(3, max_response_len=4, overlong_buffer_len=5)


def test_shaped_rewards():
    s = [_s("g", 1.0, n_gen=1), _s("g", 1.0, n_gen=4)]
    assert shaped_rewards(s) == [1.0, 1.0]
    assert shaped_rewards(s, max_response_len=4, overlong_buffer_len=2) == [1.0, 0.0]


def test_drop_zero_variance_groups_counts_and_order():
    s = [
        _s("g1", 1.0), _s("g2", 0.0), _s("g1", 1.0), _s("g2", 1.0), _s("g1", 1.0),
        _s("g3", 0.5), _s("g2", 0.0, agent="b"), _s("g2", 0.0, agent="b"),
    ]  # fmt: skip
    kept, dropped = drop_zero_variance_groups(s)
    assert kept == [s[1], s[3]]
    assert dropped == {
        "zero_reward_variance": 5,  # g1/a (3) and g2/b (2): roles are separate groups
        "zero_reward_variance_groups": 2,
        "singleton_group": 1,
        "singleton_groups": 1,
    }
    kept, dropped = drop_zero_variance_groups(s, keep_singletons=True)
    assert kept == [s[1], s[3], s[5]] and dropped["singleton_group"] == 0


def test_drop_uses_given_rewards():
    s = [_s("g", 1.0), _s("g", 1.0)]
    kept, _ = drop_zero_variance_groups(s, [1.0, 0.5])
    assert kept == s
    with pytest.raises(ValueError, match="got 1 rewards for 2 samples"):
        drop_zero_variance_groups(s, [1.0])


def test_empty_input():
    kept, dropped = drop_zero_variance_groups([])
    assert kept == [] and sum(dropped.values()) == 0
