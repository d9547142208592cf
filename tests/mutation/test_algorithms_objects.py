"""PolicyGradient objects: config validation at its boundaries, exact error messages, and that
every setting reaches the pure loss / advantage functions (survivors of the mutation run)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from areal_agents.algorithms import GRPO, GSPO, PPO, ReinforcePlusPlus
from areal_agents.algorithms import advantages as adv_fns
from areal_agents.algorithms.aggregation import weighted_sum
from areal_agents.algorithms.kl import KLEstimator, reward_kl
from areal_agents.algorithms.losses import kl_penalty, ppo_policy_loss, value_loss
from areal_agents.samples import Sample, collate


def two_samples(rewards=(1.0, 0.0)) -> list[Sample]:
    return [
        Sample([5, 6, 7, 8], [0, 1, 1, 1], [0.0, -1.0, -2.0, -0.5], [-1, 0, 0, 0],
               reward=rewards[0], group="g"),
        Sample([5, 9, 4], [0, 1, 1], [0.0, -0.5, -1.5], [-1, 0, 0], reward=rewards[1], group="g"),
    ]


def noisy(b, seed=0, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    return b.old_logprobs + scale * torch.randn(b.loss_mask.shape, generator=g) * b.loss_mask


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss_norm_len": 0}, "GRPO.loss_norm_len must be >= 1 (or None), got 0"),
    ({"behave_imp_weight_mode": "cap"}, "GRPO.behave_imp_weight_mode must be 'mask' or 'clamp'"),
    ({"kl_estimator": "k9"},
     f"GRPO.kl_estimator='k9'; choose one of {get_args(KLEstimator)}"),
    ({"clip_eps": 0.0}, "GRPO.clip_eps and clip_eps_high must be > 0"),
    ({"clip_eps_high": 0.0}, "GRPO.clip_eps and clip_eps_high must be > 0"),
    ({"dual_clip_c": 1.0}, "GRPO.dual_clip_c must be > 1 (or None), got 1.0"),
    ({"behave_imp_weight_cap": 0.0}, "GRPO.behave_imp_weight_cap must be > 0 (or None)"),
])
def test_invalid_settings_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError) as info:
        GRPO(**kwargs)
    assert str(info.value) == message


def test_settings_just_inside_the_bounds_are_accepted():
    algo = GRPO(loss_norm_len=1, clip_eps=1e-3, clip_eps_high=1e-3, dual_clip_c=1.5,
                behave_imp_weight_cap=0.5)
    assert (algo.loss_norm_len, algo.dual_clip_c, algo.behave_imp_weight_cap) == (1, 1.5, 0.5)


def test_reinforce_pp_gamma_messages():
    with pytest.raises(ValueError) as info:
        ReinforcePlusPlus(gamma=1.5)
    assert str(info.value) == "ReinforcePlusPlus.gamma must be in (0, 1], got 1.5"
    with pytest.raises(ValueError) as info:
        ReinforcePlusPlus(gamma=0.9, baseline="ema")
    assert str(info.value) == ("ReinforcePlusPlus.gamma=0.9 needs baseline='group' (the EMA "
                               "baseline is per sequence); set gamma=1 or baseline='group'")


def test_prepare_messages():
    s = two_samples()
    with pytest.raises(ValueError) as info:
        GRPO().prepare(collate(s), s[:1])
    assert str(info.value) == ("prepare() got 1 samples for a batch of 2 rows; pass the samples "
                               "the batch was collated from (after filter())")
    with pytest.raises(ValueError) as info:
        GRPO(kl_coef=0.1, kl_in_reward=True).prepare(collate(s), s)
    assert str(info.value) == (
        "GRPO.kl_in_reward needs batch.ref_logprobs before prepare(); compute reference "
        "log-probs first (needs_reference is True) or set kl_in_reward=False")


@pytest.mark.parametrize("missing", ["advantages", "loss_weights", "stat_weights"])
def test_loss_without_prepare_names_the_fix(missing):
    s = two_samples()
    b = GRPO().prepare(collate(s), s)
    setattr(b, missing, None)
    with pytest.raises(ValueError) as info:
        GRPO().loss(b.old_logprobs, torch.zeros_like(b.old_logprobs), b)
    assert str(info.value) == (
        "micro-batch has no advantages/loss_weights/stat_weights; call GRPO.prepare(batch, "
        "samples) on the full batch before splitting it")


def test_loss_with_kl_but_no_reference_names_the_fix():
    s = two_samples()
    algo = GRPO(kl_coef=0.1)
    b = algo.prepare(collate(s), s)
    with pytest.raises(ValueError) as info:
        algo.loss(b.old_logprobs, torch.zeros_like(b.old_logprobs), b)
    assert str(info.value) == ("GRPO.kl_coef=0.1 needs mb.ref_logprobs; compute reference "
                               "log-probs (needs_reference is True) or set kl_coef=0")


SETTINGS = {"clip_eps": 0.1, "clip_eps_high": 0.3, "dual_clip_c": 1.5,
            "behave_imp_weight_cap": 1.2, "behave_imp_weight_mode": "mask"}


@pytest.mark.parametrize("cls", [GRPO, GSPO])
@pytest.mark.parametrize("mode", ["mask", "clamp"])
def test_loss_is_the_policy_loss_plus_kl_minus_entropy(cls, mode):
    settings = {**SETTINGS, "behave_imp_weight_mode": mode}
    algo = cls(kl_coef=0.2, kl_estimator="k2", entropy_coef=0.05, **settings)
    s = two_samples()
    b = algo.prepare(collate(s), s)  # A > 0 on row 0, A < 0 on row 1
    m = b.loss_mask
    # u = exp(prox - behave): 1.35 on two tokens, above the cap 1.2
    b.prox_logprobs = b.old_logprobs + m * torch.tensor([[0, 0.3, 0.0, 0.1], [0, 0.3, 0.0, 0]])
    b.ref_logprobs = noisy(b, 2)
    # ratios 1.22 (between 1 + clip_eps and 1 + clip_eps_high), 0.61, 1.05 on row 0; 0.82
    # (below 1 - clip_eps) and 2.7 (beyond the dual-clip bound) on row 1
    delta = m * torch.tensor([[0, 0.2, -0.5, 0.05], [0, -0.2, 1.0, 0]])
    logp = (b.prox_logprobs + delta).requires_grad_()
    entropy = torch.rand(b.loss_mask.shape, generator=torch.Generator().manual_seed(4))
    loss, stats = algo.loss(logp, entropy, b)

    def pg(**override):
        return ppo_policy_loss(logp, b.prox_logprobs, b.old_logprobs, b.advantages, b.loss_mask,
                               b.loss_weights, stat_weights=b.stat_weights,
                               **{**settings, "sequence_level": cls.sequence_level, **override})

    pg_loss, pg_stats = pg()
    kl = weighted_sum(kl_penalty(logp, b.ref_logprobs, "k2"), b.loss_weights)
    ent = weighted_sum(entropy, b.loss_weights)
    torch.testing.assert_close(loss, pg_loss + 0.2 * kl - 0.05 * ent)
    for key, value in pg_stats.items():
        torch.testing.assert_close(stats[key], value, msg=key)
    # each setting matters on this data, so a dropped one would change the loss
    defaults = {"clip_eps": 0.2, "clip_eps_high": None, "dual_clip_c": None,
                "behave_imp_weight_cap": None,
                "behave_imp_weight_mode": "clamp" if mode == "mask" else "mask"}
    for key, default in defaults.items() if cls is GRPO else ():
        other, other_stats = pg(**{key: default})
        assert not (torch.allclose(other, pg_loss) and all(
            torch.allclose(other_stats[k], v) for k, v in pg_stats.items())), key
    assert not torch.allclose(pg(sequence_level=not cls.sequence_level)[0], pg_loss)
    # the proximal log-probs are used when set (else the behaviour ones)
    b.prox_logprobs = None
    assert not torch.allclose(algo.loss(logp, entropy, b)[0], loss)


def test_prepare_passes_the_fixed_normalisation_length():
    s = two_samples()
    b = GRPO(aggregation="seq-mean-token-sum-norm", loss_norm_len=8).prepare(collate(s), s)
    torch.testing.assert_close(b.loss_weights, b.loss_mask / (2 * 8))


def test_kl_in_reward_subtracts_each_rows_kl_sum_and_prefers_proximal_logprobs():
    s = two_samples(rewards=(1.0, 1.0))
    algo = GRPO(baseline="ema", kl_coef=0.5, kl_in_reward=True, kl_estimator="k1")
    b = collate(s)
    b.prox_logprobs = noisy(b, 5)
    b.ref_logprobs = noisy(b, 6)
    out = algo.prepare(b, s)
    kl = reward_kl(b.prox_logprobs, b.ref_logprobs, b.loss_mask, "k1")
    r = torch.tensor([1.0, 1.0], dtype=torch.float64) - 0.5 * kl.sum(-1).double()
    expected, _ = adv_fns.ema_advantages(r, [x.agent for x in s], {}, decay=0.9)
    assert expected[0] != expected[1]
    torch.testing.assert_close(out.advantages, adv_fns.broadcast_advantages(expected.float(),
                                                                            b.loss_mask))


def test_rewards_are_float64_so_tiny_differences_survive():
    # 1 and 1 + 1e-9 are equal in float32: the group would look constant and get A = 0
    s = two_samples(rewards=(1.0 + 1e-9, 1.0))
    adv = GRPO().prepare(collate(s), s).advantages
    assert adv[0, 1] > 1e-4 and adv[1, 1] < -1e-4
    adv = GRPO().advantages(s)
    assert adv[0] > 1e-4 and adv[1] < -1e-4


def test_ppo_value_loss_uses_the_settings_and_old_values():
    s = two_samples()
    algo = PPO(value_clip_eps=0.1)
    b = collate(s)
    b.values = 0.5 * b.loss_mask
    b = algo.prepare(b, s)
    b.stat_weights = b.stat_weights * 3  # distinct from loss_weights: vf_clip_frac must use it
    values = b.loss_mask * torch.tensor([[0.0, 2.0, -1.0, 0.9], [0.0, 0.2, 0.45, 0.0]])
    loss, stats = algo.value_loss(values, b)
    ref, ref_stats = value_loss(values, b.values, b.returns, b.loss_mask, b.loss_weights,
                                value_clip_eps=0.1, stat_weights=b.stat_weights)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(stats["vf_clip_frac"], ref_stats["vf_clip_frac"])
    for other in (value_loss(values, torch.zeros_like(values), b.returns, b.loss_mask,
                             b.loss_weights, value_clip_eps=0.1, stat_weights=b.stat_weights),
                  value_loss(values, b.values, b.returns, b.loss_mask, b.loss_weights,
                             value_clip_eps=0.2, stat_weights=b.stat_weights)):
        assert not torch.allclose(other[0], loss)
    assert not torch.allclose(value_loss(values, b.values, b.returns, b.loss_mask,
                                         b.loss_weights, value_clip_eps=0.1)[1]["vf_clip_frac"],
                              stats["vf_clip_frac"])
    b.values = None  # no critic values: clipped around zeros
    torch.testing.assert_close(
        algo.value_loss(values, b)[0],
        value_loss(values, torch.zeros_like(values), b.returns, b.loss_mask, b.loss_weights,
                   value_clip_eps=0.1)[0])
    b.returns = None
    with pytest.raises(ValueError) as info:
        algo.value_loss(values, b)
    assert str(info.value) == "micro-batch has no returns; call PPO.prepare(batch, samples) first"
