"""KL estimators (clamped k3, abs, verl aliases) and the KL-in-reward penalty, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from areal_agents.algorithms import GRPO, PPO, ReinforcePlusPlus
from areal_agents.algorithms.kl import KL_ESTIMATORS, kl_penalty, reward_kl
from areal_agents.samples import Sample, collate


def test_k3_is_clamped_like_verl_at_extreme_log_ratios():
    # ref - logp = 89: exp(89) overflows float32; verl clamps x to 20 and the estimate to 10
    logp = torch.tensor([[-90.0, -1.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -90.0, -0.5]])
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    x = -0.5
    assert k3.tolist()[0] == pytest.approx([10.0, 10.0, math.exp(x) - 1 - x], rel=1e-6)
    k3.sum().backward()
    assert torch.isfinite(logp.grad).all()
    # clamped tokens carry no gradient; the in-range one has d/dlogp = 1 - exp(x)
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, 1 - math.exp(x)], rel=1e-6)


def test_estimators_and_verl_aliases_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])  # x = [-0.5, 1]
    expected = {
        "k1": [0.5, -1.0],
        "k2": [0.125, 0.5],
        "k3": [math.exp(-0.5) - 0.5, math.e - 2],
        "abs": [0.5, 1.0],
    }
    for name, values in expected.items():
        assert kl_penalty(logp, ref, name).tolist()[0] == pytest.approx(values, rel=1e-6)
    for alias, name in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        assert torch.equal(kl_penalty(logp, ref, alias), kl_penalty(logp, ref, name))
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "abs", "kl", "mse", "low_var_kl"}
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; choose one of \('k1'"):
        kl_penalty(logp, ref, "k4")
    assert GRPO(kl_estimator="low_var_kl").kl_estimator == "low_var_kl"


def test_reward_kl_masks_and_detaches():
    logp = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    kl = reward_kl(logp, torch.tensor([[5.0, -1.5, -1.0]]), torch.tensor([[0, 1, 1]]), "k1")
    assert kl.tolist() == [[0.0, 0.5, -1.0]] and not kl.requires_grad


def _two_samples():
    # row 0: two generated tokens, reward 1; row 1: one generated token, reward 0
    return [
        Sample([5, 6, 7], [0, 1, 1], [0.0, -1.0, -2.0], [-1, 0, 0], reward=1.0, group="g"),
        Sample([5, 8, 0], [0, 1, 0], [0.0, -0.5, 0.0], [-1, 0, -1], reward=0.0, group="g"),
    ]


def _with_ref(batch):
    batch.ref_logprobs = torch.tensor([[0.0, -1.5, -1.0], [0.0, -1.5, 0.0]])
    return batch


def test_kl_in_reward_enters_grpo_advantages_by_hand():
    s = _two_samples()
    algo = GRPO(kl_coef=0.1, kl_estimator="k1", kl_in_reward=True, decoupled=False)
    assert algo.needs_reference
    b = algo.prepare(_with_ref(collate(s)), s)
    # k1 = logp - ref: row 0: 0.5 - 1.0 = -0.5 summed; row 1: 1.0
    r = torch.tensor([1.0 - 0.1 * -0.5, 0.0 - 0.1 * 1.0])  # [1.05, -0.1]
    a = ((r - r.mean()) / (r.std() + 1e-6)).tolist()  # two rows: +-1/sqrt(2)
    assert b.advantages.tolist()[0] == pytest.approx([0.0, a[0], a[0]], abs=1e-6)
    assert b.advantages.tolist()[1] == pytest.approx([0.0, a[1], 0.0], abs=1e-6)
    # the proximal log-probs (same engine as the reference) are preferred when set
    b2 = collate(s)
    b2.prox_logprobs = b2.old_logprobs + 1.0 * b2.loss_mask  # k1 + 1 per token
    b2 = GRPO(kl_coef=10.0, kl_estimator="k1", kl_in_reward=True).prepare(_with_ref(b2), s)
    # r = [1 - 10 * 1.5, 0 - 10 * 2.0] = [-14, -20]: row 0 is now the better one
    assert b2.advantages[0, 1] > 0 > b2.advantages[1, 1]


def test_kl_in_reward_is_not_in_the_loss_but_is_logged():
    s = _two_samples()
    b = _with_ref(collate(s))
    logp = (b.old_logprobs + 0.3 * b.loss_mask).requires_grad_()
    in_reward = GRPO(kl_coef=0.5, kl_in_reward=True, decoupled=False)
    in_loss = GRPO(kl_coef=0.5, decoupled=False)
    no_kl = GRPO(decoupled=False)
    pr = in_reward.prepare(b, s)
    loss_r, st_r = in_reward(logp, torch.zeros_like(logp), pr)
    loss_0, _ = no_kl(logp, torch.zeros_like(logp), pr)
    assert loss_r.item() == pytest.approx(loss_0.item())
    kl_tokens = kl_penalty(logp.detach(), b.ref_logprobs)[b.loss_mask != 0]
    assert st_r["kl"].item() == pytest.approx(kl_tokens.mean().item(), rel=1e-6)
    loss_l, st_l = in_loss(logp, torch.zeros_like(logp), in_loss.prepare(b, s))
    assert loss_l.item() != pytest.approx(loss_r.item())
    assert st_l["kl"].item() == pytest.approx(st_r["kl"].item())


def test_kl_in_reward_without_reference_names_the_fix():
    s = _two_samples()
    for cls in (GRPO, PPO, ReinforcePlusPlus):
        with pytest.raises(ValueError, match=r"kl_in_reward needs batch.ref_logprobs before"):
            cls(kl_coef=0.1, kl_in_reward=True).prepare(collate(s), s)
    # kl_coef=0: nothing to subtract, no reference needed
    GRPO(kl_in_reward=True).prepare(collate(s), s)


def test_kl_in_reward_for_ppo_is_a_token_penalty():
    s = _two_samples()
    algo = PPO(kl_coef=0.1, kl_estimator="k1", kl_in_reward=True, decoupled=False,
               gamma=1.0, gae_lambda=1.0, adv_norm=False)  # fmt: skip
    b = algo.prepare(_with_ref(collate(s)), s)
    # zero values, gamma = lambda = 1: return = sum of later token rewards
    # row 0 token rewards [-0.05, 1 + 0.1]; row 1 [-0.1]
    assert b.returns.tolist()[0] == pytest.approx([0.0, 1.05, 1.1])
    assert b.returns.tolist()[1] == pytest.approx([0.0, -0.1, 0.0])
