"""The train step's LM-head savings keep results identical: log-probs only at the loss's
positions (``loss_positions``) and the one-chunk log-softmax kept for the backward
(``trainers/logprobs.py``) give the losses, stats and weights of the full computation."""

from __future__ import annotations

import copy

import pytest
import torch

from areal_agents.algorithms import GRPO
from areal_agents.models import tiny
from areal_agents.samples import Sample, collate
from areal_agents.trainers import logprobs as lp_mod
from areal_agents.trainers.fsdp import FSDPEngine
from areal_agents.trainers.logprobs import RowSampling, chunked_logprobs, sequence_logprobs
from areal_agents.trainers.step import loss_positions


def _batch(vocab: int, lengths=(12, 9, 16, 5, 7, 14), seed: int = 0):
    """Prompt (first third, loss mask 0) + completion rows, GRPO-ready weights."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        k = n // 3
        old = (-6.8 + 0.3 * torch.randn(n - k, generator=g)).tolist()
        samples.append(Sample(ids, [0] * k + [1] * (n - k), [0.0] * k + old, [0] * n, reward=1.0))
    batch = collate(samples, temperature=0.9)
    batch.advantages = torch.randn(batch.input_ids.shape, generator=g) * batch.loss_mask
    batch.loss_weights = batch.loss_mask / batch.loss_mask.sum()
    batch.stat_weights = batch.loss_weights.clone()
    return batch


def _hidden(n: int = 24, h: int = 16, vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, h, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, labels


def _grads(hidden, weight, labels, sampling):
    lp, ent = chunked_logprobs(hidden, weight, labels, sampling)
    (lp.sum() + 0.1 * ent.sum()).backward()  # both gradient paths (log-prob and entropy)
    return lp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone()


def _count_logit_matmuls(monkeypatch) -> list[int]:
    calls = [0]
    real = lp_mod._chunk_logits

    def counted(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(lp_mod, "_chunk_logits", counted)
    return calls


def test_one_chunk_keeps_its_log_softmax_and_matches_the_recompute_bitwise(monkeypatch):
    calls = _count_logit_matmuls(monkeypatch)
    kept = _grads(*_hidden(), 0.7)
    assert calls[0] == 1  # the backward reused the forward's log-softmax: one LM-head matmul
    monkeypatch.setattr(lp_mod, "SAVE_MAX_ELEMENTS", 0)  # force the chunked recompute
    recomputed = _grads(*_hidden(), 0.7)
    assert calls[0] == 3
    for a, b in zip(kept, recomputed, strict=True):
        assert torch.equal(a, b)


def test_filtering_rows_and_several_chunks_still_recompute(monkeypatch):
    calls = _count_logit_matmuls(monkeypatch)
    hidden, weight, labels = _hidden()
    top_k = RowSampling(torch.full((24,), 0.7), torch.full((24,), 5))
    _grads(hidden, weight, labels, top_k)
    assert calls[0] == 2  # the kept set's mask is not saved: recomputed as before
    no_filter = (torch.ones(24), torch.zeros(24, dtype=torch.long), torch.ones(24))
    lp, _ = lp_mod._ChunkedLogprobs.apply(*_hidden()[:3], *no_filter, 10)  # 3 chunks of 10 rows
    lp.sum().backward()
    assert calls[0] == 2 + 3 + 3


def test_positions_give_the_same_values_there_and_zero_elsewhere():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 16, generator=g)
    weight = torch.randn(40, 16, generator=g) * 0.3
    ids = torch.randint(0, 40, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 5:] = False
    positions = torch.zeros(3, 7, dtype=torch.bool)
    positions[:, 4:] = True
    full_lp, full_ent = sequence_logprobs(hidden, weight, ids, mask, 0.8)
    lp, ent = sequence_logprobs(hidden, weight, ids, mask, 0.8, positions=positions)
    want = positions & mask
    torch.testing.assert_close(lp[want], full_lp[want], rtol=0, atol=1e-6)
    torch.testing.assert_close(ent[want], full_ent[want], rtol=0, atol=1e-6)
    assert not lp[~want].any() and not ent[~want].any()
    assert full_lp[0, 1:4].ne(0).all()  # the prompt positions the restricted call skipped


def test_loss_positions_are_the_loss_mask_and_nonzero_weights():
    batch = _batch(64)
    assert torch.equal(loss_positions(batch), batch.loss_mask != 0)
    batch.loss_weights = batch.loss_weights.clone()
    batch.loss_weights[0, 1] = 0.5  # a weight off the mask is still read by the loss
    pos = loss_positions(batch)
    assert pos[0, 1] and pos.sum() == (batch.loss_mask != 0).sum() + 1


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_grpo_steps_equal_the_all_positions_forward(entropy_coef):
    """Two GRPO steps on a fixed batch: losses, stats and weights within 1e-6 of the same
    engine forwarding every position (the step before ``loss_positions``)."""
    model, _ = tiny("xs", seed=0)
    batch = _batch(model.config.vocab_size)
    algo = GRPO(clip_eps=0.2, entropy_coef=entropy_coef)
    kwargs = dict(lr=1e-2, max_grad_norm=1.0, token_budget=40)
    engine = FSDPEngine(copy.deepcopy(model), **kwargs)
    seen = []

    def spy(logprobs, entropy, mb):
        seen.append((logprobs.detach(), mb.loss_mask))
        return algo.loss(logprobs, entropy, mb)

    got = [engine.train_step(batch, spy) for _ in range(2)]
    ref = FSDPEngine(copy.deepcopy(model), **kwargs)
    ref._train_forward = ref._forward  # every real position through the LM head
    want = [ref.train_step(batch, algo.loss) for _ in range(2)]
    for g_stats, w_stats in zip(got, want, strict=True):
        assert g_stats.keys() == w_stats.keys()
        for k in w_stats:
            assert g_stats[k] == pytest.approx(w_stats[k], abs=1e-6), k
    for name, p in ref.trainable_parameters().items():
        torch.testing.assert_close(engine.trainable_parameters()[name], p, rtol=0, atol=1e-6)
    # the loss saw log-probs on its own tokens only: prompt positions were never computed
    for logprobs, loss_mask in seen:
        assert not logprobs[loss_mask == 0].any() and logprobs[loss_mask != 0].ne(0).all()
