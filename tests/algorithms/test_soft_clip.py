"""CISPO and SAPO: values and gradients against their formulas, objects, micro-batches."""

from __future__ import annotations

import pytest
import torch

from areal_agents.algorithms import CISPO, GRPO, SAPO
from areal_agents.algorithms.soft_clip import cispo_policy_loss, sapo_policy_loss
from areal_agents.samples import Sample, collate

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
W = MASK / MASK.sum()  # token mean
LOG_R = torch.tensor([[0.0, 1.1, -0.9, 0.0], [0.15, -0.1, 0.0, 0.0]])  # r = e^LOG_R
ADV = torch.tensor([[1.0, 1.0, 1.0, 0.0], [-2.0, -2.0, 0.0, 0.0]])
PROX = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.5, -0.7, 0.0, 0.0]])


def _logp():
    return (PROX + LOG_R).requires_grad_()


def test_cispo_value_and_gradient_match_the_formula():
    logp = _logp()
    loss, stats = cispo_policy_loss(logp, PROX, PROX, ADV, MASK, W, W,
                                    clip_eps=0.2, clip_eps_high=0.28)  # fmt: skip
    weight = LOG_R.exp().clamp(0.8, 1.28)  # the IS weight, clipped and detached
    assert loss.item() == pytest.approx((-weight * ADV * W).sum().item(), rel=1e-6)
    loss.backward()
    # d/dlogp of -sg(clip(r)) * A * logp is -clip(r) * A: no token is dropped
    assert torch.allclose(logp.grad, -weight * ADV * W, atol=1e-7)
    assert logp.grad[0, 1] != 0  # r = 3 with A > 0: the PPO clip gives this token no gradient
    # clipped weights: r = e^1.1, e^-0.9 (row 0); e^0.15 = 1.16 and e^-0.1 stay inside
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)


def test_cispo_keeps_the_gradient_ppo_drops():
    s = [Sample([1, 2, 3], [0, 1, 1], [0.0, -1.0, -1.0], [-1, 0, 0], reward=r, group="g")
         for r in (1.0, 0.0)]  # fmt: skip
    logp = None
    grads = {}
    for algo in (GRPO(), CISPO()):
        b = algo.prepare(collate(s), s)
        logp = (b.old_logprobs + 1.0 * b.loss_mask).requires_grad_()  # r = e for every token
        algo(logp, torch.zeros_like(logp), b)[0].backward()
        grads[type(algo).__name__] = logp.grad[0, 1].item()
    assert grads["GRPO"] == 0.0  # clipped: A > 0 and r > 1 + eps
    assert grads["CISPO"] < 0  # weight 1.28 times -A * w


@pytest.mark.parametrize(("tau_pos", "tau_neg"), [(1.0, 1.05), (0.5, 3.0)])
def test_sapo_value_and_gradient_match_the_formula(tau_pos, tau_neg):
    logp = _logp()
    loss, stats = sapo_policy_loss(logp, PROX, PROX, ADV, MASK, W, W,
                                   tau_pos=tau_pos, tau_neg=tau_neg)  # fmt: skip
    r = LOG_R.exp()
    tau = torch.where(ADV > 0, tau_pos, tau_neg)
    s = torch.sigmoid(tau * (r - 1))
    assert loss.item() == pytest.approx((-(4 / tau) * s * ADV * W).sum().item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, -4 * s * (1 - s) * r * ADV * W, atol=1e-7)
    assert stats["soft_gate"].item() == pytest.approx((4 * s * (1 - s) * W).sum().item())


def test_sapo_on_policy_is_the_plain_policy_gradient():
    logp = PROX.clone().requires_grad_()  # r = 1
    loss, stats = sapo_policy_loss(logp, PROX, PROX, ADV, MASK, W, W)
    loss.backward()
    assert torch.allclose(logp.grad, -ADV * W, atol=1e-7)
    assert stats["soft_gate"].item() == pytest.approx(1.0)


def test_behaviour_weight_scales_both_losses():
    behave = PROX - 0.1 * MASK  # u = e^0.1 on every token
    for fn in (cispo_policy_loss, sapo_policy_loss):
        on = fn(_logp(), PROX, PROX, ADV, MASK, W, W)[0]
        off, stats = fn(_logp(), PROX, behave, ADV, MASK, W, W)
        assert off.item() == pytest.approx(on.item() * torch.tensor(0.1).exp().item(), rel=1e-6)
        assert stats["imp_weight"].item() == pytest.approx(torch.tensor(0.1).exp().item())


def test_objects_defaults_and_validation():
    assert (CISPO().clip_eps, CISPO().clip_eps_high, CISPO().aggregation) == (
        1.0, 0.28, "token-mean")  # fmt: skip
    assert (SAPO().tau_pos, SAPO().tau_neg) == (1.0, 1.05)
    assert CISPO().group_relative and SAPO().group_relative
    with pytest.raises(ValueError, match=r"SAPO.tau_pos and tau_neg must be > 0, got 0.0, 1.05"):
        SAPO(tau_pos=0.0)
    with pytest.raises(ValueError, match=r"CISPO.dual_clip_c does not apply"):
        CISPO(dual_clip_c=3.0)
