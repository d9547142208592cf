"""Pure algorithm functions: keyword defaults, boundaries and exact messages that the mutation
run found unpinned (numerical behaviour is tested in tests/algorithms)."""

from __future__ import annotations

import math

import pytest
import torch

from areal_agents.algorithms import DAPO, GRPO
from areal_agents.algorithms import advantages as adv_fns
from areal_agents.algorithms.aggregation import loss_weights
from areal_agents.algorithms.filtering import drop_zero_variance_groups, shaped_rewards
from areal_agents.algorithms.kl import reward_kl
from areal_agents.algorithms.losses import (
    behave_importance_weight,
    clipped_surrogate,
    importance_ratios,
    ppo_policy_loss,
    value_loss,
)
from areal_agents.samples import Sample

MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])


def test_check_messages_and_two_dimensional_rewards():
    with pytest.raises(ValueError) as info:
        adv_fns.grpo_advantages(torch.zeros(2), torch.zeros(3, dtype=torch.long))
    assert str(info.value) == "rewards and group_ids must both be [N]; got (2,) and (3,)"
    with pytest.raises(ValueError) as info:  # same shapes, but not [N]
        adv_fns.grpo_advantages(torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long))
    assert str(info.value) == "rewards and group_ids must both be [N]; got (2, 1) and (2, 1)"


def test_gae_defaults_are_gamma_1_and_lambda_095():
    r = adv_fns.terminal_rewards(torch.tensor([1.0, -0.5]), MASK)
    v = torch.tensor([[0.0, 0.3, -0.2, 0.7], [0.0, 0.1, 0.4, 0.0]])
    adv, ret = adv_fns.gae(r, v, MASK)
    ref_adv, ref_ret = adv_fns.gae(r, v, MASK, gamma=1.0, gae_lambda=0.95)
    torch.testing.assert_close((adv, ret), (ref_adv, ref_ret))
    # by hand, row 1: delta_2 = -0.5 - 0.4, delta_1 = 0.4 - 0.1; A_1 = delta_1 + 0.95 delta_2
    assert adv[1, 1].item() == pytest.approx(0.3 + 0.95 * -0.9)
    assert adv[1, 2].item() == pytest.approx(-0.9)


def test_reinforce_pp_token_advantages_default_gamma_and_penalty():
    r = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1, 1, 1], [0.0, 1, 1, 0], [1.0, 1, 0, 0]])
    penalty = torch.tensor([[5.0, 0.1, 0.2, 0.0], [5.0, 0.3, 0.0, 5.0], [0.0, 0.1, 5.0, 5.0]])
    got = adv_fns.reinforce_pp_token_advantages(r, mask, token_penalty=penalty)
    ref = adv_fns.reinforce_pp_token_advantages(r, mask, token_penalty=penalty, gamma=1.0)
    torch.testing.assert_close(got, ref)
    # the penalty off the mask (5.0) is ignored: each row's return is r - its masked penalties
    ret0 = torch.tensor([1.0 - 0.3, 0.0 - 0.3, 0.5 - 0.1], dtype=torch.float64)
    expected = (ret0 - ret0.mean()) / (ret0.std() + 1e-6)
    first = torch.tensor([1, 1, 0])
    torch.testing.assert_close(got[torch.arange(3), first], expected)


def test_reinforce_pp_token_advantages_with_a_constant_group_centred_return_are_zero():
    r = torch.tensor([1.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    gids = torch.tensor([0, 0])
    out = adv_fns.reinforce_pp_token_advantages(r, mask, gids)
    assert torch.equal(out, torch.zeros(2, 2, dtype=torch.float64))
    one = adv_fns.reinforce_pp_token_advantages(r[:1], mask[:1])  # one sequence: zeros
    assert torch.equal(one, torch.zeros(1, 2, dtype=torch.float64))


def test_ema_default_decay_and_zero_decay_is_allowed():
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    adv, new = adv_fns.ema_advantages(r, ["a", "a"], {"a": 0.5})
    ref_adv, ref_new = adv_fns.ema_advantages(r, ["a", "a"], {"a": 0.5}, decay=0.9)
    torch.testing.assert_close(adv, ref_adv)
    assert new == pytest.approx(ref_new)
    adv0, _ = adv_fns.ema_advantages(r, ["a", "a"], {"a": 0.5}, decay=0.0)
    assert adv0.dtype == torch.float64


def test_masked_whiten_with_two_positions():
    x = torch.tensor([[0.0, 1.0, 3.0]])
    out = adv_fns.masked_whiten(x, torch.tensor([[0, 1, 1]]))
    s = math.sqrt(2.0)  # unbiased std of (1, 3)
    torch.testing.assert_close(out, torch.tensor([[0.0, -1 / (s + 1e-6), 1 / (s + 1e-6)]]))
    unit = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # std exactly 1: still whitened
    torch.testing.assert_close(adv_fns.masked_whiten(unit, torch.tensor([[0, 1, 1, 1]]), eps=0.5),
                               torch.tensor([[0.0, -1 / 1.5, 0.0, 1 / 1.5]]))


def test_reinforce_pp_advantages_with_unit_std():
    r = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(adv_fns.reinforce_pp_advantages(r, eps=0.5),
                               torch.tensor([-1 / 1.5, 0.0, 1 / 1.5]))


def test_loss_weights_boundaries_and_dtype():
    single = torch.tensor([[0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    w = loss_weights(single, "seq-mean-token-sum-norm")  # longest row: 1 token
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, single.float() / 2)
    torch.testing.assert_close(loss_weights(MASK, "seq-mean-token-sum-norm", 1), MASK / 2)


def test_clipped_surrogate_default_and_dual_clip_boundary():
    ratio = torch.tensor([1.5, 2.0])
    loss, _, _ = clipped_surrogate(ratio, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(loss, torch.tensor([-1.2, -1.2]))
    # ratio exactly c with A < 0: the clip bound equals the loss; not counted as dual-clipped
    loss, _, dual = clipped_surrogate(torch.tensor([2.0]), torch.tensor([-1.0]),
                                            dual_clip_c=2.0)
    assert loss.tolist() == [2.0] and dual.tolist() == [False]


def test_behave_weight_cap_boundary_and_default_mode():
    prox = torch.tensor([[0.0, 0.5, math.log(3.0)]])
    behave = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    u, capped = behave_importance_weight(prox, behave, mask, cap=1.0)  # u = 1 is not above 1
    assert capped.tolist() == [[False, True, True]]
    assert u.tolist() == [[1.0, 0.0, 0.0]]  # default mode: dropped
    logp = prox + 0.1
    _, _, u_r, _ = importance_ratios(logp, prox, behave, mask, behave_imp_weight_cap=1.2)
    assert u_r[0, 2].item() == 0.0
    pieces = (logp, prox, behave, torch.ones(1, 3), mask, mask / 3)
    loss, _ = ppo_policy_loss(*pieces, behave_imp_weight_cap=1.2)
    ref, _ = ppo_policy_loss(*pieces, behave_imp_weight_cap=1.2, behave_imp_weight_mode="mask",
                             sequence_level=False)
    torch.testing.assert_close(loss, ref)
    other, _ = ppo_policy_loss(*pieces, behave_imp_weight_cap=1.2, sequence_level=True)
    assert not torch.allclose(other, loss)


def test_value_loss_default_clip_lower_bound_and_stat_weights():
    values = torch.tensor([[-1.0, 0.5, 0.0]])
    old = torch.zeros(1, 3)
    returns = torch.tensor([[-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, mask / 2)
    # token 0: V moved 1 below V_old, clipped to -0.2: err_clip 0.64 > err 0
    # token 1: clipped to 0.2: err_clip 0.04 < err 0.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25) / 2)
    sw = torch.tensor([[0.25, 0.75, 9.0]])  # 9.0 off the mask is ignored
    _, stats = value_loss(values, old, returns, mask, mask / 2, stat_weights=sw)
    assert stats["vf_clip_frac"].item() == pytest.approx(0.25)


def test_k3_clamps_the_log_ratio_from_below():
    logp = torch.tensor([[-30.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0]])
    mask = torch.ones(1, 2)
    out = reward_kl(logp, ref, mask)  # default estimator: k3
    torch.testing.assert_close(out, reward_kl(logp, ref, mask, "k3"))
    assert out[0, 1].item() == 0.0
    assert out[0, 0].item() == pytest.approx(10.0)  # value clamp


def _sample(reward, group, n_gen=1):
    return Sample([0] * (n_gen + 1), [0] + [1] * n_gen, [0.0] * (n_gen + 1), [-1] + [0] * n_gen,
                  reward=reward, group=group)


def test_drop_counts_every_singleton_group():
    s = [_sample(1.0, "a"), _sample(0.0, "b"), _sample(1.0, "c"), _sample(0.0, "c")]
    kept, dropped = drop_zero_variance_groups(s, [1.0, 0.0, 1.0, 0.0])
    assert kept == s[2:]
    assert dropped["singleton_group"] == 2 and dropped["singleton_groups"] == 2


def test_shaped_rewards_need_both_lengths_and_pass_the_factor():
    s = [_sample(1.0, "g", n_gen=4)]
    assert shaped_rewards(s, max_response_len=4) == [1.0]
    assert shaped_rewards(s, overlong_buffer_len=2) == [1.0]
    assert shaped_rewards(s, max_response_len=4, overlong_buffer_len=2,
                          penalty_factor=0.5) == [0.5]
    dapo = DAPO(max_response_len=4, overlong_buffer_len=2, overlong_penalty_factor=0.5)
    assert dapo.rewards(s) == [0.5]


def test_grpo_passes_std_normalize_and_eps():
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g = torch.tensor([0, 0])
    torch.testing.assert_close(GRPO(std_normalize=False)._group_advantages(r, g),
                               torch.tensor([0.5, -0.5], dtype=torch.float64))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(GRPO(eps=0.5)._group_advantages(r, g),
                               torch.tensor([0.5, -0.5], dtype=torch.float64) / (s + 0.5))
