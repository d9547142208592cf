"""REINFORCE++ with a KL penalty, a discount and a group baseline, and PPO with critic values,
checked against values computed by hand on tiny inputs (the algorithms survivors the mutation
run called real gaps: see docs/mutation_testing.md)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from areal_agents.algorithms import CISPO, PPO, SAPO, ReinforcePlusPlus
from areal_agents.algorithms.advantages import reinforce_pp_token_advantages
from areal_agents.algorithms.soft_clip import cispo_policy_loss, sapo_policy_loss
from areal_agents.samples import Sample, collate


def rows(rewards, groups=None) -> list[Sample]:
    """One prompt token and two generated tokens per sample."""
    groups = groups or ["g"] * len(rewards)
    return [Sample([1, 2 + i, 3], [0, 1, 1], [0.0, -1.0, -1.0], [-1, 0, 0], reward=r, group=g)
            for i, (r, g) in enumerate(zip(rewards, groups, strict=True))]


def with_kl(samples: list[Sample], kl: list[list[float]]):
    """The collated batch with reference log-probs such that k1 = logp - ref = ``kl``."""
    b = collate(samples)
    return replace(b, ref_logprobs=b.old_logprobs - torch.tensor(kl) * b.loss_mask)


# ---- REINFORCE++ ------------------------------------------------------------------------------


def test_reinforce_pp_kl_in_reward_with_gamma_one_is_per_token():
    """gamma 1 with a KL penalty takes the token-level path: a token's return counts only the
    penalties from it on, so the two tokens of a row get different advantages."""
    s = rows([1.0, 0.0])
    b = with_kl(s, [[0.0, 0.5, 2.0], [0.0, 2.0, 0.5]])
    algo = ReinforcePlusPlus(kl_coef=0.5, kl_estimator="k1", kl_in_reward=True, decoupled=False)
    adv = algo.prepare(b, s).advantages
    # penalties 0.5 * kl: row 0 [0.25, 1], row 1 [1, 0.25]; token rewards row 0 [-0.25, 1 - 1],
    # row 1 [-1, -0.25] -> G row 0 [-0.25, 0], row 1 [-1.25, -0.25]
    # x = [-0.25, -1.25]: mu -0.75, sigma 1 / sqrt(2)
    sigma = 1 / math.sqrt(2)
    assert adv.tolist()[0] == pytest.approx([0.0, 0.5 / sigma, 0.75 / sigma], abs=1e-5)
    assert adv.tolist()[1] == pytest.approx([0.0, -0.5 / sigma, 0.5 / sigma], abs=1e-5)


def test_reinforce_pp_ema_baseline_with_kl_in_reward_stays_per_sequence():
    """baseline='ema' never takes the token-level path: the penalised reward r - kl_coef * sum
    KL gets the EMA baseline (the batch mean the first time), broadcast over the row."""
    s = rows([1.0, 0.0])
    b = with_kl(s, [[0.0, 0.5, 2.0], [0.0, 2.0, 0.5]])
    algo = ReinforcePlusPlus(baseline="ema", kl_coef=0.5, kl_estimator="k1", kl_in_reward=True,
                             decoupled=False)  # fmt: skip
    adv = algo.prepare(b, s).advantages
    # penalised rewards [1 - 1.25, 0 - 1.25] = [-0.25, -1.25]; baseline their mean -0.75
    assert adv.tolist() == [[0.0, 0.5, 0.5], [0.0, -0.5, -0.5]]
    assert algo.ema_baselines == {"": pytest.approx(-0.75)}


@pytest.mark.parametrize("group_baseline", [True, False])
def test_reinforce_pp_discount_with_and_without_group_baseline(group_baseline):
    s = rows([1.0, 0.0, 2.0, 2.0], groups=["a", "a", "b", "b"])
    algo = ReinforcePlusPlus(gamma=0.5, group_baseline=group_baseline, eps=0.5)
    adv = algo.prepare(collate(s), s).advantages
    # G per row = [0.5 r, r]; x = 0.5 r = [0.5, 0, 1, 1]
    if group_baseline:  # c = group means of x = [0.25, 0.25, 1, 1]; x - c = [.25, -.25, 0, 0]
        c, mu = [0.25, 0.25, 1.0, 1.0], 0.0
        sigma = math.sqrt(2 * 0.25**2 / 3)
    else:
        c, mu = [0.0] * 4, 0.625
        sigma = math.sqrt((0.125**2 + 0.625**2 + 2 * 0.375**2) / 3)
    rewards = [1.0, 0.0, 2.0, 2.0]
    for i, r in enumerate(rewards):
        expected = [0.0] + [(g - c[i] - mu) / (sigma + 0.5) for g in (0.5 * r, r)]
        assert adv.tolist()[i] == pytest.approx(expected, abs=1e-6)


def test_reinforce_pp_discounted_rewards_are_float64():
    """Rewards 1e8 + 1 and 1e8 are equal in float32 (zero spread: no signal); in float64 they
    are one apart."""
    s = [Sample([1, 2], [0, 1], [0.0, -1.0], [-1, 0], reward=r) for r in (1e8 + 1, 1e8)]
    adv = ReinforcePlusPlus(gamma=0.5).prepare(collate(s), s).advantages
    sigma = 1 / math.sqrt(2)
    assert adv[:, 0].tolist() == [0.0, 0.0]
    assert adv[:, 1].tolist() == pytest.approx([0.5 / sigma, -0.5 / sigma], abs=1e-5)


def test_reinforce_pp_scalar_advantages_use_eps():
    s = [Sample([1], [1], [0.0], [0], reward=r) for r in (1.0, 0.0)]
    sigma = 1 / math.sqrt(2)
    assert ReinforcePlusPlus(eps=0.5).advantages(s) == pytest.approx(
        [0.5 / (sigma + 0.5), -0.5 / (sigma + 0.5)])


def test_token_advantages_with_unit_spread_are_not_zeroed():
    r = torch.tensor([0.0, 2.0, 1.0])  # mean 1, unbiased std exactly 1
    adv = reinforce_pp_token_advantages(r, torch.ones(3, 1))
    assert adv[:, 0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-5)


def test_token_advantages_zero_when_every_group_has_no_spread():
    """x - c is 0 everywhere (each group's returns are equal): all advantages are 0, also on
    the discounted tokens whose return differs from x."""
    r = torch.tensor([1.0, 1.0, 3.0, 3.0])
    adv = reinforce_pp_token_advantages(r, torch.ones(4, 2), torch.tensor([0, 0, 1, 1]),
                                        gamma=0.5)
    assert adv.tolist() == [[0.0, 0.0]] * 4


# ---- PPO with critic values -------------------------------------------------------------------

VALUES = [0.0, 0.2, 0.4]
# one row, generated tokens at 1 and 2, reward 1; gamma = lambda = 0.5, no whitening:
# t=2: delta = 1 - 0.4 = 0.6; t=1: delta = 0.5 * 0.4 - 0.2 = 0, A = 0 + 0.25 * 0.6 = 0.15
WITH_VALUES = [0.0, 0.15, 0.6]
# zero values: t=2: 1; t=1: 0.25 * 1
WITHOUT_VALUES = [0.0, 0.25, 1.0]


def ppo() -> PPO:
    return PPO(gamma=0.5, gae_lambda=0.5, adv_norm=False)


def test_ppo_advantages_with_and_without_critic_values():
    s = rows([1.0])
    assert ppo().advantages(s, values=[VALUES]) == [pytest.approx(WITH_VALUES)]
    assert ppo().advantages(s) == [pytest.approx(WITHOUT_VALUES)]


def test_ppo_prepare_reads_the_batch_values():
    s = rows([1.0])
    b = ppo().prepare(replace(collate(s), values=torch.tensor([VALUES])), s)
    assert b.advantages.tolist()[0] == pytest.approx(WITH_VALUES)
    assert b.returns.tolist()[0] == pytest.approx([0.0, 0.35, 1.0])  # A + V on the mask
    b = ppo().prepare(collate(s), s)
    assert b.returns.tolist()[0] == pytest.approx(WITHOUT_VALUES)


def test_ppo_prepare_passes_loss_norm_len():
    s = rows([1.0, 0.0])
    algo = PPO(aggregation="seq-mean-token-sum-norm", loss_norm_len=4)
    w = algo.prepare(collate(s), s).loss_weights
    assert w.tolist() == [[0.0, 0.125, 0.125]] * 2  # 1 / (2 sequences * 4), not * 2 tokens


# ---- CISPO / SAPO pass the cap mode -----------------------------------------------------------


@pytest.mark.parametrize(("cls", "pure"), [(CISPO, cispo_policy_loss), (SAPO, sapo_policy_loss)])
def test_soft_clip_losses_pass_the_behaviour_cap_mode(cls, pure):
    """A token of row 0 whose behaviour weight exp(prox - behave) = e exceeds the cap 1.5 is dropped
    with mode 'mask' and clamped to 1.5 with 'clamp': the two losses differ."""
    s = rows([1.0, 0.0])
    losses = {}
    for mode in ("mask", "clamp"):
        algo = cls(behave_imp_weight_cap=1.5, behave_imp_weight_mode=mode)
        b = algo.prepare(collate(s), s)
        b = replace(b, prox_logprobs=b.old_logprobs + torch.tensor([[0.0, 1.0, 0.0], [0.0] * 3]))
        logp = b.prox_logprobs.clone().requires_grad_()
        losses[mode], _ = algo.loss(logp, torch.zeros_like(logp), b)
        kwargs = {"clip_eps": algo.clip_eps, "clip_eps_high": algo.clip_eps_high} \
            if cls is CISPO else {"tau_pos": algo.tau_pos, "tau_neg": algo.tau_neg}
        expected, _ = pure(logp, b.prox_logprobs, b.old_logprobs, b.advantages, b.loss_mask,
                           b.loss_weights, b.stat_weights, behave_imp_weight_cap=1.5,
                           behave_imp_weight_mode=mode, **kwargs)  # fmt: skip
        assert losses[mode].item() == pytest.approx(expected.item())
    assert losses["mask"].item() != pytest.approx(losses["clamp"].item())
