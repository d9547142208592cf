"""The proximal log-probs of stale rows taken from the train step's own forward
(``ProximalFromForward``) instead of a separate ``forward_logprobs`` pass: no extra pass, the
same losses, stats and weights (to 1e-6) on a fixed off-policy batch."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from areal_agents.algorithms import GRPO
from areal_agents.models import tiny
from areal_agents.samples import Sample, SamplingDistribution, collate
from areal_agents.trainers.fsdp import FSDPEngine
from areal_agents.trainers.proximal import (
    ProximalFromForward,
    prox_in_train_forward,
    proximal_logprobs,
)


def _samples(vocab: int, version: int, lengths=(12, 9, 16, 5, 7, 14), seed: int = 0,
             stale_every: int = 2):
    """Every ``stale_every``-th row (from row 1) is one version behind; random behaviour
    log-probs (importance weights away from 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        k = n // 3
        old = (-6.8 + 0.5 * torch.randn(n - k, generator=g)).tolist()
        v = version - (i % stale_every != 0 or stale_every == 1)
        out.append(Sample(ids, [0] * k + [1] * (n - k), [0.0] * k + old, [-1] * k + [v] * (n - k),
                          reward=float(i % 3), group=str(i // 2),
                          sampling=SamplingDistribution(0.9)))
    return out


class _CountingEngine:
    """Counts ``forward_logprobs`` calls (the separate pass the fused path avoids)."""

    version = 3

    def __init__(self) -> None:
        self.calls = 0

    def forward_logprobs(self, batch):
        self.calls += 1
        return torch.zeros(batch.input_ids.shape)


def test_stale_rows_take_no_separate_pass_in_forward_mode():
    samples = _samples(64, version=3)
    batch = collate(samples, temperature=0.9)
    engine = _CountingEngine()
    assert proximal_logprobs(batch, samples, engine, exact=True, in_forward=True) == (None, 0.0)
    assert engine.calls == 0
    prox, skipped = proximal_logprobs(batch, samples, engine, exact=True)
    assert engine.calls == 1 and skipped == 0.5  # rows 0, 2, 4 are current
    current = [s for i, s in enumerate(samples) if i % 2 == 0]
    cur = collate(current, temperature=0.9)
    prox, skipped = proximal_logprobs(cur, current, engine, exact=True, in_forward=True)
    assert skipped == 1.0 and torch.equal(prox, cur.old_logprobs) and engine.calls == 1


def test_a_kl_in_the_reward_keeps_the_separate_pass():
    assert prox_in_train_forward(GRPO())
    assert prox_in_train_forward(GRPO(kl_coef=0.1))  # a KL in the loss reads no prox in prepare
    assert not prox_in_train_forward(GRPO(kl_coef=0.1, kl_in_reward=True))


def test_the_wrapper_pickles_for_remote_workers():
    wrapped = pickle.loads(pickle.dumps(ProximalFromForward(GRPO(clip_eps=0.3).loss)))
    assert wrapped.loss.__self__.clip_eps == 0.3


@pytest.mark.parametrize("cap", [None, 2.0])
def test_prox_from_the_train_forward_equals_the_recompute(cap):
    """Two GRPO steps on an off-policy batch: the separate ``forward_logprobs`` pass (before)
    and the train forward's own log-probs (now) give the same stats and weights. (Every row is
    stale: a current row keeps its behaviour log-probs in the separate pass, which equal the
    forward's only for a real exact engine, not for this test's random ones.)"""
    model, _ = tiny("xs", seed=0)
    algo = GRPO(clip_eps=0.2, behave_imp_weight_cap=cap)
    kwargs = dict(lr=1e-2, max_grad_norm=1.0, token_budget=40)
    engines = [FSDPEngine(copy.deepcopy(model), **kwargs) for _ in range(2)]
    history: list[list[dict[str, float]]] = [[], []]
    for step in range(2):
        samples = _samples(model.config.vocab_size, version=step, seed=step, stale_every=1)
        for i, engine in enumerate(engines):
            engine.version = step
            batch = collate(samples, temperature=0.9)
            if i == 0:  # the separate pass
                batch.prox_logprobs, _ = proximal_logprobs(batch, samples, engine, exact=True)
                loss = algo.loss
            else:
                batch.prox_logprobs, _ = proximal_logprobs(batch, samples, engine, exact=True,
                                                           in_forward=True)
                assert batch.prox_logprobs is None
                loss = ProximalFromForward(algo.loss)
            history[i].append(engine.train_step(algo.prepare(batch, samples), loss))
    want, got = history
    assert abs(want[0]["imp_weight"] - 1.0) > 1e-3  # prox is not behaviour: not vacuous
    for g_stats, w_stats in zip(got, want, strict=True):
        assert g_stats.keys() == w_stats.keys()
        for k in w_stats:
            assert g_stats[k] == pytest.approx(w_stats[k], abs=1e-6), k
    for name, p in engines[0].trainable_parameters().items():
        torch.testing.assert_close(engines[1].trainable_parameters()[name], p, rtol=0, atol=1e-6)
