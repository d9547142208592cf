"""REINFORCE++ with a discount: token-level returns, sequence-level whitening, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from areal_agents.algorithms import ReinforcePlusPlus
from areal_agents.algorithms.advantages import (
    broadcast_advantages,
    group_ids,
    reinforce_pp_advantages,
    reinforce_pp_token_advantages,
)
from areal_agents.samples import Sample, collate


@pytest.mark.parametrize("grouped", [False, True])
def test_gamma_one_reproduces_the_sequence_level_estimator(samples_factory, grouped):
    s = samples_factory(seed=4, empty_mask_rows=(2,))
    r = torch.tensor([x.reward for x in s], dtype=torch.float64)
    mask = collate(s).loss_mask
    gids = group_ids(s) if grouped else None
    token = reinforce_pp_token_advantages(r, mask, gids, gamma=1.0)
    scalar = broadcast_advantages(reinforce_pp_advantages(r, gids), mask)
    assert torch.allclose(token.float(), scalar, atol=1e-6)
    algo = ReinforcePlusPlus(group_baseline=grouped)
    assert torch.equal(algo.prepare(collate(s), s).advantages, scalar)


def test_discounted_returns_skip_observation_tokens_by_hand():
    # row 0 generates at positions 1 and 3 (2 is an observation), reward 1; row 1 reward 0
    s = [
        Sample([1, 2, 3, 4], [0, 1, 0, 1], [0.0, -1.0, 0.0, -1.0], [-1, 0, -1, 0], reward=1.0),
        Sample([1, 5], [0, 1], [0.0, -1.0], [-1, 0], reward=0.0),
    ]
    b = ReinforcePlusPlus(gamma=0.5).prepare(collate(s), s)
    # G = [[., 0.5, ., 1], [., 0]]; sequence returns x = [0.5, 0]: mu 0.25, sigma sqrt(1/8)
    sigma = math.sqrt(0.125)
    a = [(0.5 - 0.25) / sigma, (1 - 0.25) / sigma, (0 - 0.25) / sigma]
    assert b.advantages.tolist()[0] == pytest.approx([0, a[0], 0, a[1]], abs=1e-5)
    assert b.advantages.tolist()[1] == pytest.approx([0, a[2], 0, 0], abs=1e-5)


def test_kl_in_reward_is_discounted_with_the_reward():
    s = [
        Sample([1, 2, 3], [0, 1, 1], [0.0, -1.0, -1.0], [-1, 0, 0], reward=1.0),
        Sample([1, 5, 6], [0, 1, 1], [0.0, -1.0, -1.0], [-1, 0, 0], reward=0.0),
    ]
    b = collate(s)
    b.ref_logprobs = b.old_logprobs - 1.0 * b.loss_mask  # k1 = logp - ref = 1 per token
    algo = ReinforcePlusPlus(gamma=0.5, kl_coef=0.2, kl_estimator="k1", kl_in_reward=True,
                             decoupled=False)  # fmt: skip
    adv = algo.prepare(b, s).advantages
    # token rewards row 0 [-0.2, 0.8] -> G [0.2, 0.8]; row 1 [-0.2, -0.2] -> G [-0.3, -0.2]
    # x = [0.2, -0.3]: mu -0.05, sigma 0.5 / sqrt(2)
    sigma = 0.5 / math.sqrt(2)
    expected = [[0, 0.25 / sigma, 0.85 / sigma], [0, -0.25 / sigma, -0.15 / sigma]]
    assert adv.tolist()[0] == pytest.approx(expected[0], abs=1e-5)
    assert adv.tolist()[1] == pytest.approx(expected[1], abs=1e-5)


def test_gamma_validation_and_group_flag():
    with pytest.raises(ValueError, match=r"ReinforcePlusPlus.gamma must be in \(0, 1\], got 0"):
        ReinforcePlusPlus(gamma=0)
    with pytest.raises(ValueError, match=r"gamma=0.9 needs baseline='group'"):
        ReinforcePlusPlus(gamma=0.9, baseline="ema")
    assert not ReinforcePlusPlus().group_relative
    assert ReinforcePlusPlus(group_baseline=True).group_relative
