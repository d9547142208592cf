"""Policy, KL and value losses against hand values and a float64 per-token Python reference."""

from __future__ import annotations

import math

import pytest
import torch

from areal_agents.algorithms.aggregation import loss_weights
from areal_agents.algorithms.losses import (
    behave_importance_weight,
    clipped_surrogate,
    kl_penalty,
    ppo_policy_loss,
    value_loss,
)


def ref_ppo(logp, prox, behave, adv, mask, w, eps_lo, eps_hi, c, cap, mode, seq):
    """Loop-per-token float64 reference of the decoupled PPO / GSPO loss; returns (loss, capped)."""
    total, num_capped = 0.0, 0
    for b in range(len(mask)):
        toks = [t for t, m in enumerate(mask[b]) if m]
        if not toks:
            continue
        s_ratio = math.exp(sum(logp[b][t] - prox[b][t] for t in toks) / len(toks))
        s_u = math.exp(sum(prox[b][t] - behave[b][t] for t in toks) / len(toks))
        for t in toks:
            r = s_ratio if seq else math.exp(logp[b][t] - prox[b][t])
            u = s_u if seq else math.exp(prox[b][t] - behave[b][t])
            if cap is not None and u > cap:
                num_capped += 1
                u = 0.0 if mode == "mask" else cap
            a = adv[b][t]
            term = max(-a * r, -a * min(max(r, 1 - eps_lo), 1 + eps_hi))
            if c is not None and a < 0:
                term = min(term, -a * c)
            total += w[b][t] * u * term
    return total, num_capped


def _random(seed, b=6, t=10, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) < 0.6).long()
    mask[:, 0] = 0
    mask[seed % b] = 0  # an empty row
    mask[(seed + 1) % b] = 0
    mask[(seed + 1) % b, 3] = 1  # a one-token row
    behave = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    prox = behave + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    logp = prox + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t) * mask
    return logp, prox, behave, adv, mask


CONFIGS = [
    dict(clip_eps=0.2, clip_eps_high=None, dual_clip_c=None, cap=None, mode="mask"),
    dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip_c=3.0, cap=1.3, mode="mask"),
    dict(clip_eps=0.1, clip_eps_high=0.3, dual_clip_c=1.5, cap=1.1, mode="clamp"),
]


@pytest.mark.parametrize("seq", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_ppo_loss_matches_reference(seq, cfg, seed, agg):
    logp, prox, behave, adv, mask = _random(seed)
    w = loss_weights(mask.double(), agg)
    loss, stats = ppo_policy_loss(
        logp, prox, behave, adv, mask, w, clip_eps=cfg["clip_eps"],
        clip_eps_high=cfg["clip_eps_high"], dual_clip_c=cfg["dual_clip_c"],
        behave_imp_weight_cap=cfg["cap"], behave_imp_weight_mode=cfg["mode"], sequence_level=seq,
    )  # fmt: skip
    hi = cfg["clip_eps_high"] or cfg["clip_eps"]
    expected, num_capped = ref_ppo(
        logp.tolist(), prox.tolist(), behave.tolist(), adv.tolist(), mask.tolist(), w.tolist(),
        cfg["clip_eps"], hi, cfg["dual_clip_c"], cfg["cap"], cfg["mode"], seq,
    )  # fmt: skip
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    assert stats["pg_loss"].item() == pytest.approx(expected, abs=1e-10)
    assert stats["num_imp_weight_capped"].item() == num_capped


def test_ppo_loss_by_hand_single_token():
    # one token, A = 1, ratio e^0.5 > 1.2 -> clipped at 1.2, loss -1.2, no gradient
    mask = torch.tensor([[0, 1]])
    w = loss_weights(mask, "token-mean")
    prox = torch.tensor([[0.0, -1.0]])
    logp = torch.tensor([[0.0, -0.5]], requires_grad=True)
    loss, st = ppo_policy_loss(logp, prox, prox, torch.tensor([[0.0, 1.0]]), mask, w)
    assert loss.item() == pytest.approx(-1.2)
    assert st["clip_frac"].item() == 1.0 and st["imp_weight"].item() == 1.0
    loss.backward()
    assert logp.grad.abs().sum() == 0
    # A = -1 with ratio e^1.5 and dual clip c = 3: loss = min(e^1.5, 3) = 3
    logp2 = torch.tensor([[0.0, 0.5]])
    loss, st = ppo_policy_loss(logp2, prox, prox, torch.tensor([[0.0, -1.0]]), mask, w,
                               dual_clip_c=3.0)  # fmt: skip
    assert loss.item() == pytest.approx(3.0) and st["dual_clip_frac"].item() == 1.0


def test_clip_higher_is_asymmetric():
    ratio = torch.tensor([0.7, 1.25, 1.35])
    adv = torch.ones(3)
    loss, clipped, _ = clipped_surrogate(ratio, adv, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.tolist() == pytest.approx([-0.7, -1.25, -1.28])
    assert clipped.tolist() == [False, False, True]
    loss, clipped, _ = clipped_surrogate(ratio, -adv, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.tolist() == pytest.approx([0.8, 1.25, 1.35])
    assert clipped.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        clipped_surrogate(ratio, adv, dual_clip_c=1.0)


def test_behave_weight_cap_modes():
    prox = torch.log(torch.tensor([[1.0, 4.0, 1.0, 8.0]]))
    behave = torch.zeros(1, 4)
    mask = torch.tensor([[0, 1, 1, 1]])
    u, capped = behave_importance_weight(prox, behave, mask, cap=5.0, mode="mask")
    assert u[0].tolist() == pytest.approx([0.0, 4.0, 1.0, 0.0])
    assert capped.tolist() == [[False, False, False, True]]
    u, _ = behave_importance_weight(prox, behave, mask, cap=5.0, mode="clamp")
    assert u[0].tolist() == pytest.approx([0.0, 4.0, 1.0, 5.0])


@pytest.mark.parametrize("seq", [False, True])
def test_decoupled_reduces_to_standard_ppo(seq):
    logp, _, behave, adv, mask = _random(1)
    w = loss_weights(mask, "token-mean").double()
    dec, st = ppo_policy_loss(logp, behave, behave, adv, mask, w, behave_imp_weight_cap=2.0,
                              sequence_level=seq)  # fmt: skip
    # standard PPO / GSPO written directly: ratio against the behaviour policy, no weight
    log_r = (logp - behave) * mask
    if seq:
        log_r = (log_r.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(
            logp
        )
    r = torch.exp(log_r)
    std = (torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2)) * w).sum()
    assert dec.item() == pytest.approx(std.item(), abs=1e-12)
    assert st["imp_weight_capped_frac"].item() == 0.0
    assert st["imp_weight"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("seq", [False, True])
def test_gradient_direction(seq):
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    old = torch.full((2, 3), -1.0)
    adv = torch.tensor([[0.0, 1.0, 1.0], [0.0, -1.0, -1.0]])
    logp = old.clone().requires_grad_()
    loss, _ = ppo_policy_loss(logp, old, old, adv, mask, loss_weights(mask), sequence_level=seq)
    loss.backward()
    assert (logp.grad[0, 1:] < 0).all() and (logp.grad[1, 1:] > 0).all()
    assert (logp.grad[:, 0] == 0).all()


def test_gspo_gradient_is_the_sequence_ratio_gradient():
    # one row, loss = -A * s with s = exp(mean_t(logp - prox)); d s / d logp_t = s / n for
    # every token, so all tokens share one gradient
    mask = torch.tensor([[0, 1, 1, 1]])
    prox = torch.tensor([[0.0, -1.0, -1.0, -1.0]])
    logp = torch.tensor([[0.0, -0.9, -1.2, -1.0]], requires_grad=True)
    adv = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    loss, _ = ppo_policy_loss(logp, prox, prox, adv, mask, loss_weights(mask),
                              clip_eps=1.0, sequence_level=True)  # fmt: skip
    loss.backward()
    s = math.exp((0.1 - 0.2 + 0.0) / 3)
    assert logp.grad[0, 1:].tolist() == pytest.approx([-s / 3] * 3)


def test_empty_mask_loss_is_zero_with_finite_grad():
    mask = torch.zeros(2, 3)
    logp = torch.full((2, 3), -50.0, requires_grad=True)
    prox = torch.zeros(2, 3)
    loss, stats = ppo_policy_loss(logp, prox, prox + 60, torch.ones(2, 3), mask,
                                  loss_weights(mask), sequence_level=True)  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    x = [-0.5, 1.0]
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.exp(v) - 1 - v for v in x])
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_kl_estimators_are_unbiased_in_expectation():
    # sample from p and compare means with the exact KL(p || q) for two categoricals
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        assert kl_penalty(p.log()[x], q.log()[x], est).mean().item() == pytest.approx(
            exact, rel=0.05
        )


def test_value_loss_by_hand():
    mask = torch.tensor([[0, 1, 1]])
    w = loss_weights(mask)
    old = torch.tensor([[0.0, 1.0, 1.0]])
    ret = torch.tensor([[0.0, 2.0, 0.0]])
    v = torch.tensor([[5.0, 1.5, 1.1]], requires_grad=True)
    loss, st = value_loss(v, old, ret, mask, w, value_clip_eps=0.2)
    # token 1: max((1.5-2)^2, (1.2-2)^2) = 0.64 ; token 2: max(1.21, 1.1^2) = 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert st["vf_clip_frac"].item() == pytest.approx(0.5)
    loss, _ = value_loss(v, old, ret, mask, w, value_clip_eps=None)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.21) / 2)
    loss.backward()
    assert v.grad[0, 0] == 0
