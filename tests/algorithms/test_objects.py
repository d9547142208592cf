"""Algorithm objects: prepare/loss contract, micro-batch additivity, flags, filtering, errors."""

from __future__ import annotations

import math

import pytest
import torch

from areal_agents.algorithms import (
    DAPO,
    GRPO,
    GSPO,
    PPO,
    RLOO,
)
from areal_agents.algorithms.registry import ALGORITHMS
from areal_agents.samples import Sample, TokenBatch, collate

ALGOS = list(ALGORITHMS.values())


def _batch(algo, samples, seed=0, prox=True, ref=True):
    g = torch.Generator().manual_seed(seed)
    b = algo.prepare(collate(samples), samples)
    m = b.loss_mask
    noise = lambda: 0.3 * torch.randn(m.shape, generator=g) * m  # noqa: E731
    if prox:
        b.prox_logprobs = b.old_logprobs + noise()
    if ref:
        b.ref_logprobs = b.old_logprobs + noise()
    if isinstance(algo, PPO):
        b.values = torch.randn(m.shape, generator=g) * m
        b = algo.prepare(b, samples)
    logp = (b.old_logprobs + noise()).requires_grad_()
    entropy = torch.rand(m.shape, generator=g)
    return b, logp, entropy


def test_grpo_end_to_end_by_hand():
    # two samples in one group, rewards 1 and 0: A = +-1/sqrt(2) (unbiased std = 1/sqrt(2))
    s = [
        Sample([5, 6, 7], [0, 1, 1], [0.0, -1.0, -2.0], [-1, 0, 0], reward=1.0, group="g"),
        Sample([5, 8], [0, 1], [0.0, -0.5], [-1, 0], reward=0.0, group="g"),
    ]
    algo = GRPO(behave_imp_weight_cap=None)
    b = algo.prepare(collate(s), s)
    a = 1 / math.sqrt(2)
    assert torch.allclose(b.advantages, torch.tensor([[0, a, a], [0, -a, 0]]), atol=1e-5)
    # seq-mean-token-mean: row 0 tokens weigh 1/(2*2), row 1 token 1/(1*2)
    assert torch.allclose(b.loss_weights, torch.tensor([[0, 0.25, 0.25], [0, 0.5, 0]]))
    # on-policy (logp == old): ratio 1, loss = -sum(w * A)
    logp = b.old_logprobs.clone().requires_grad_()
    loss, stats = algo.loss(logp, torch.zeros_like(logp), b)
    expected = -(0.25 * a * 2 - 0.5 * a)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac"].item() == 0.0
    assert stats["num_loss_tokens"].item() == 3.0
    loss.backward()
    # gradient of the loss is -w*A: negative (logprob goes up) where A > 0
    assert (logp.grad[0, 1:] < 0).all() and logp.grad[1, 1] > 0
    assert logp.grad[:, 0].abs().sum() == 0 and logp.grad[1, 2] == 0


@pytest.mark.parametrize("cls", ALGOS)
def test_microbatch_losses_grads_and_stats_add_up(cls, samples_factory):
    samples = samples_factory(seed=3, empty_mask_rows=(4,))
    dual = {} if cls.__name__ in ("CISPO", "SAPO") else {"dual_clip_c": 3.0}
    algo = cls(kl_coef=0.1, entropy_coef=0.01, behave_imp_weight_cap=1.2, **dual)
    b, logp, ent = _batch(algo, samples)
    full, full_stats = algo(logp, ent, b)
    (g_full,) = torch.autograd.grad(full, logp)
    total = torch.zeros(())
    grad = torch.zeros_like(logp)
    sums = {k: torch.zeros(()) for k in full_stats}
    for rows in ([0, 5, 2], [1, 4], [3], list(range(6, len(samples)))):
        mb = b.select(rows)
        width = mb.input_ids.shape[1]
        lp = logp.detach()[rows][:, :width].requires_grad_()
        loss, st = algo(lp, ent[rows][:, :width], mb)
        (g,) = torch.autograd.grad(loss, lp)
        grad[torch.tensor(rows)[:, None], torch.arange(width)] += g
        total = total + loss.detach()
        for k in sums:
            sums[k] = sums[k] + st[k]
    assert total.item() == pytest.approx(full.item(), abs=1e-5)
    assert torch.allclose(grad, g_full, atol=1e-6)
    for k, v in full_stats.items():
        assert sums[k].item() == pytest.approx(v.item(), abs=1e-5), k


@pytest.mark.parametrize("cls", ALGOS)
def test_positive_advantage_raises_logprob(cls):
    s = [
        Sample([1, 2, 3], [0, 1, 1], [0.0, -1.0, -1.0], [-1, 0, 0], reward=1.0, group="g"),
        Sample([1, 4, 5], [0, 1, 1], [0.0, -1.0, -1.0], [-1, 0, 0], reward=0.0, group="g"),
    ]
    algo = cls()
    b = algo.prepare(collate(s), s)
    logp = b.old_logprobs.clone().requires_grad_()
    loss, _ = algo(logp, torch.zeros_like(logp), b)
    loss.backward()
    assert (logp.grad[0, 1:] < 0).all()  # descent raises logp of the rewarded sample
    assert (logp.grad[1, 1:] > 0).all()


@pytest.mark.parametrize("cls", ALGOS)
def test_all_empty_masks_give_zero_loss(cls):
    s = [Sample([1, 2], [0, 0], [0.0, 0.0], [-1, -1], reward=float(i), group="g") for i in (0, 1)]
    algo = cls(kl_coef=0.1, entropy_coef=0.1)
    b = algo.prepare(collate(s), s)
    b.ref_logprobs = torch.full((2, 2), -3.0)
    logp = torch.full((2, 2), -1.0, requires_grad=True)
    loss, stats = algo(logp, torch.ones(2, 2), b)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(logp.grad).any()
    assert all(not torch.isnan(v) for v in stats.values())


def test_flags():
    assert GRPO().needs_proximal and not GRPO().needs_reference
    assert GRPO(kl_coef=0.01).needs_reference
    assert not PPO(decoupled=False).needs_proximal


def test_loss_without_prepare_or_reference_raises():
    s = [Sample([1, 2], [0, 1], [0.0, -1.0], [-1, 0], reward=1.0)]
    b = collate(s)
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"call GRPO.prepare\(batch, samples\)"):
        GRPO()(lp, lp, b)
    b = GRPO(kl_coef=0.1).prepare(b, s)
    with pytest.raises(ValueError, match=r"needs mb\.ref_logprobs"):
        GRPO(kl_coef=0.1)(lp, lp, b)
    with pytest.raises(ValueError, match=r"prepare\(\) got 2 samples for a batch of 1 rows"):
        GRPO().prepare(b, s * 2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"aggregation": "mean"}, "aggregation"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"dual_clip_c": 0.5}, "dual_clip_c"),
        ({"baseline": "none"}, "baseline"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GRPO.{field}"):
        GRPO(**kwargs)


def test_dapo_defaults_filter_and_overlong_shaping():
    algo = DAPO(max_response_len=4, overlong_buffer_len=2)
    assert (algo.clip_eps, algo.clip_eps_high, algo.aggregation) == (0.2, 0.28, "token-mean")

    def mk(group, reward, n_gen):
        return Sample([0] * (n_gen + 1), [0] + [1] * n_gen, [0.0] + [-1.0] * n_gen,
                      [-1] + [0] * n_gen, reward=reward, group=group)  # fmt: skip

    s = [mk("same", 1.0, 1), mk("same", 1.0, 2), mk("diff", 1.0, 1), mk("diff", 0.0, 1),
         mk("shaped", 1.0, 1), mk("shaped", 1.0, 3), mk("alone", 1.0, 1)]  # fmt: skip
    assert algo.rewards(s)[5] == pytest.approx(0.5)  # 3 tokens: -(3-2)/2
    kept, dropped = algo.filter(s)
    assert [x.group for x in kept] == ["diff", "diff", "shaped", "shaped"]
    assert dropped["zero_reward_variance"] == 2 and dropped["zero_reward_variance_groups"] == 1
    assert dropped["singleton_group"] == 1
    assert DAPO(dynamic_sampling=False).filter(s) == (s, {})
    assert GRPO().filter(s) == (s, {})


def test_groups_are_per_role(samples_factory):
    # two roles in the same task group: each role is normalised separately
    s = samples_factory(seed=1, num_groups=1, group_size=3, roles=("x", "y"))
    adv = torch.tensor(GRPO().advantages(s))
    for role in ("x", "y"):
        rows = [i for i, x in enumerate(s) if x.agent == role]
        if len({s[i].reward for i in rows}) > 1:
            assert adv[rows].sum().abs() < 1e-5


def test_ema_baseline_keeps_state_per_role():
    algo = RLOO(baseline="ema", ema_decay=0.5)
    s = [
        Sample([1], [1], [0.0], [0], reward=r, agent=a)
        for r, a in ((1.0, "p"), (3.0, "p"), (5.0, "q"))
    ]
    assert algo.advantages(s) == [-1.0, 1.0, 0.0]
    assert algo.ema_baselines == {"p": 2.0, "q": 5.0}
    assert algo.advantages(s[:1]) == [-1.0]  # baseline 2.0 from before
    assert algo.ema_baselines["p"] == 1.5


def test_ppo_prepare_sets_returns_and_value_loss_additive(samples_factory):
    samples = samples_factory(seed=5)
    algo = PPO(gamma=0.9, gae_lambda=0.8)
    b, _, _ = _batch(algo, samples)
    assert b.returns is not None and b.advantages.shape == b.loss_mask.shape
    assert (b.returns[b.loss_mask == 0] == 0).all()
    v = (b.values + 0.5 * torch.randn(b.values.shape)).requires_grad_()
    full, st = algo.value_loss(v, b)
    parts = sum(
        algo.value_loss(v.detach()[r][:, : b.select(r).input_ids.shape[1]], b.select(r))[0]
        for r in ([0, 1, 2], list(range(3, len(samples))))
    )
    assert parts.item() == pytest.approx(full.item(), abs=1e-5)
    assert st["vf_loss"].item() == pytest.approx(full.item())
    per_token = algo.advantages(samples, values=[[0.0] * len(x) for x in samples])
    assert [len(a) for a in per_token] == [len(x) for x in samples]


def test_decoupled_equals_standard_when_prox_is_behaviour(samples_factory):
    samples = samples_factory(seed=2)
    algo = GRPO(behave_imp_weight_cap=1.5)
    b, logp, ent = _batch(algo, samples, prox=False)
    standard, _ = algo(logp, ent, b)
    b2 = TokenBatch(**{**b.__dict__, "prox_logprobs": b.old_logprobs.clone()})
    decoupled, st = algo(logp, ent, b2)
    assert decoupled.item() == pytest.approx(standard.item(), abs=1e-7)
    assert st["imp_weight_capped_frac"].item() == 0.0


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import Qwen3ForCausalLM

    from areal_agents.models import tiny_config

    torch.manual_seed(0)
    return Qwen3ForCausalLM(tiny_config("xs")).float()


def _model_logprobs(model, batch):
    """[B, T] log p(token t | < t) aligned with input_ids (position 0 is 0), and entropy."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp_all = torch.log_softmax(logits[:, :-1].float(), -1)
    lp = logp_all.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    pad = torch.zeros(lp.shape[0], 1)
    return torch.cat([pad, lp], 1), torch.cat([pad, ent], 1)


@pytest.mark.parametrize("cls", [GRPO, GSPO, DAPO])
def test_tiny_model_step_moves_logprobs_and_microbatch_grads_add_up(cls, tiny_model):
    model = tiny_model
    rows = [([3, 4, 5, 6, 7], 1.0), ([3, 4, 9, 10], 0.0), ([3, 8, 11, 12, 13, 14], 0.0)]
    samples = [
        Sample(
            ids,
            [0, 0] + [1] * (len(ids) - 2),
            [0.0] * len(ids),
            [-1, -1] + [0] * (len(ids) - 2),
            reward=r,
            group="g",
        )
        for ids, r in rows
    ]
    algo = cls(clip_eps=0.2, clip_eps_high=0.28)
    batch = collate(samples)
    with torch.no_grad():
        behave, _ = _model_logprobs(model, batch)
    batch.old_logprobs = behave * batch.loss_mask
    batch = algo.prepare(batch, samples)

    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    lp, ent = _model_logprobs(model, batch)
    loss, _ = algo(lp, ent, batch)
    loss.backward()
    full = [p.grad.clone() for p in params]
    model.zero_grad()
    for idx in ([0], [1, 2]):
        mb = batch.select(idx)
        lp, ent = _model_logprobs(model, mb)
        algo(lp, ent, mb)[0].backward()
    for g_full, p in zip(full, params, strict=True):
        assert torch.allclose(p.grad, g_full, atol=1e-6)

    # one SGD step on the full-batch gradient: the rewarded sample becomes more likely
    with torch.no_grad():
        for g_full, p in zip(full, params, strict=True):
            p -= 0.5 * g_full
        after, _ = _model_logprobs(model, batch)
        for g_full, p in zip(full, params, strict=True):
            p += 0.5 * g_full  # restore the shared fixture
    gain = ((after - batch.old_logprobs) * batch.loss_mask).sum(-1)
    assert gain[0] > 0 and gain[1] < 0 and gain[2] < 0


def test_base_class_names_the_concrete_algorithms():
    from areal_agents.algorithms import PolicyGradient

    s = [Sample([1], [1], [0.0], [0], reward=1.0)]
    with pytest.raises(NotImplementedError, match="use GRPO, DrGRPO, RLOO"):
        PolicyGradient().advantages(s)
    assert GRPO().advantages([]) == []
