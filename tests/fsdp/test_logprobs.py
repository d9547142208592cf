"""Chunked log-probs/entropy equal the full log-softmax, with gradients, at any temperature,
and the processed (top-k/top-p) distribution per row against a plain autograd reference."""

from __future__ import annotations

import pytest
import torch

from areal_agents.engines.sampling import processed_logprobs
from areal_agents.trainers.logprobs import (
    RowSampling,
    chunked_logprobs,
    full_logprobs,
    sequence_logprobs,
)


def _reference(hidden, weight, labels, t):
    logp_all = torch.log_softmax(hidden @ weight.t() / t, -1)
    return logp_all.gather(-1, labels[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_matches_full_values_and_grads(temperature, chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(17, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (10,), generator=g)
    c_lp, c_ent = chunked_logprobs(hidden.float().requires_grad_(), weight.float(), labels,
                                   temperature, chunk_size)
    r_lp, r_ent = _reference(hidden, weight, labels, temperature)
    torch.testing.assert_close(c_lp.double(), r_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_ent.double(), r_ent, atol=1e-5, rtol=1e-5)

    # gradient of a mixed objective through both outputs, in float64 against autograd
    a, b = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = chunked_logprobs(h1, w1, labels, temperature, chunk_size)
    ((lp * a).sum() + (ent * b).sum()).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2, ent2 = _reference(h2, w2, labels, temperature)
    ((lp2 * a).sum() + (ent2 * b).sum()).backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)  # float32 inside
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (5,), generator=g)

    def fn(h, w):
        lp, ent = chunked_logprobs(h, w, labels, 0.8, 2)
        return lp.double(), ent.double()

    # forward computes in float32, so compare analytic grads with loose numerical tolerance
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-3, atol=5e-3, rtol=5e-3)


def test_sequence_alignment_and_padding():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(11, 8, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    lp, ent = sequence_logprobs(hidden, weight, ids, mask, 0.9, chunk_size=2)
    ref_lp, ref_ent = full_logprobs(hidden @ weight.t(), ids, mask, 0.9)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    assert lp[:, 0].eq(0).all() and lp[1, 3:].eq(0).all() and ent[1, 3:].eq(0).all()
    # position t is the log-prob of ids[t] given ids[:t]: predicted from hidden[t-1]
    manual = torch.log_softmax(hidden[0, 2] @ weight.t() / 0.9, -1)[ids[0, 3]]
    assert lp[0, 3].item() == pytest.approx(manual.item(), abs=1e-5)


def test_rejects_bad_arguments():
    h, w, y = torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        chunked_logprobs(h, w, y, -0.5)
    with pytest.raises(ValueError, match="sampling parameters have 3 rows but the input has 2"):
        chunked_logprobs(h, w, y, RowSampling.uniform(3, 0.7))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logprobs(h, w, y, 1.0, 0)
    with pytest.raises(ValueError, match="shape mismatch"):
        chunked_logprobs(h, torch.zeros(4, 5), y)


@pytest.mark.parametrize("use", ["logprobs", "entropy"])
def test_grads_when_only_one_output_is_used(use):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (6,), generator=g)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = chunked_logprobs(h1, w1, labels, 0.5, 4)
    (lp if use == "logprobs" else ent).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2, ent2 = _reference(h2, w2, labels, 0.5)
    (lp2 if use == "logprobs" else ent2).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-4)


def _processed_reference(hidden, weight, labels, rows: RowSampling):
    """Plain autograd: the engine's processed distribution with the kept set (plus the label)
    held constant; float64 throughout."""
    logits = hidden @ weight.t()
    with torch.no_grad():
        engine = processed_logprobs(logits.float(), rows.temperature, rows.top_k, rows.top_p)
        drop = torch.isinf(engine)
        drop[torch.arange(len(labels)), labels] = False
    temp = torch.where(rows.temperature > 0, rows.temperature, 1.0).double()
    logp_all = torch.log_softmax((logits / temp[:, None]).masked_fill(drop, float("-inf")), -1)
    lp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    return lp, -(logp_all.exp() * logp_all.masked_fill(drop, 0.0)).sum(-1)


def _mixed_rows(n: int) -> RowSampling:
    # every combination the engine supports, including greedy rows with (ignored) filters
    temps = torch.tensor([0.5, 1.0, 1.3, 0.0, 0.7, 1.3, 0.5, 2.0, 1.0, 0.9])[:n]
    top_k = torch.tensor([0, 5, 0, 3, 4, 5, 0, 2, 0, 8])[:n]
    top_p = torch.tensor([0.9, 1.0, 0.9, 0.5, 1.0, 0.8, 1.0, 0.6, 0.95, 0.3])[:n]
    return RowSampling(temps, top_k, top_p)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_processed_distribution_values_and_grads_match_autograd(chunk_size):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(10, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(17, 8, generator=g, dtype=torch.float64)
    rows = _mixed_rows(10)
    # labels: mostly tokens the processed distribution can sample, plus two it filters out
    engine = processed_logprobs((hidden @ weight.t()).float(), rows.temperature, rows.top_k,
                                rows.top_p)
    labels = torch.multinomial(engine.exp(), 1, generator=g).squeeze(-1)
    labels[2] = int(engine[2].argmin())  # filtered at T=1.3, top_p=0.9
    labels[7] = int(engine[7].argmin())  # filtered by top_k=2
    assert torch.isinf(engine[2, labels[2]]) and torch.isinf(engine[7, labels[7]])

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = chunked_logprobs(h1, w1, labels, rows, chunk_size)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    r_lp, r_ent = _processed_reference(h2, w2, labels, rows)
    torch.testing.assert_close(lp.double(), r_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, atol=1e-5, rtol=1e-5)
    # sampleable labels: exactly the engine's processed log-prob
    ok = torch.ones(10, dtype=torch.bool)
    ok[[2, 7]] = False
    torch.testing.assert_close(lp[ok], engine[ok, labels[ok]], atol=1e-5, rtol=0)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()

    a, b = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    ((lp * a).sum() + (ent * b).sum()).backward()
    ((r_lp * a).sum() + (r_ent * b).sum()).backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-4)


def test_processed_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (6,), generator=g)
    rows = RowSampling(torch.tensor([0.6, 1.3, 0.8, 1.0, 0.5, 2.0]),
                       torch.tensor([3, 0, 5, 2, 0, 4]), torch.tensor([1.0, 0.7, 0.9, 1.0, 0.5, 0.8]))

    def fn(h, w):
        lp, ent = chunked_logprobs(h, w, labels, rows, 4)
        return lp.double(), ent.double()

    # the kept set is fixed under small perturbations unless a logit sits on a cut-off
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-4, atol=5e-3, rtol=5e-3)


def test_sequence_logprobs_per_row_sampling_matches_full_reference():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 6, 8, generator=g)
    weight = torch.randn(13, 8, generator=g)
    ids = torch.randint(0, 13, (3, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]], dtype=torch.bool)
    rows = RowSampling(torch.tensor([0.5, 1.3, 0.0]), torch.tensor([5, 0, 3]),
                       torch.tensor([1.0, 0.9, 0.5]))
    lp, ent = sequence_logprobs(hidden, weight, ids, mask, rows, chunk_size=3)
    ref_lp, ref_ent = full_logprobs(hidden @ weight.t(), ids, mask, rows)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    # row 2 is greedy: temperature-1 log-probs, nothing filtered
    plain, _ = full_logprobs(hidden @ weight.t(), ids, mask, 1.0)
    torch.testing.assert_close(lp[2], plain[2])
    # row 0 at T=0.5, top_k=5: position 1 (a kept token) by hand from the engine's definition
    engine = processed_logprobs((hidden[0, 0] @ weight.t())[None], torch.tensor([0.5]),
                                torch.tensor([5]), torch.tensor([1.0]))[0]
    assert torch.isfinite(engine[ids[0, 1]])
    assert lp[0, 1].item() == pytest.approx(engine[ids[0, 1]].item(), abs=1e-5)
    # positions 2.. hold tokens outside the top 5: renormalised over the kept set + the label
    kept = [*torch.topk(hidden[0, 1] @ weight.t() / 0.5, 5).indices.tolist(), int(ids[0, 2])]
    z = (hidden[0, 1] @ weight.t() / 0.5)[kept]
    assert lp[0, 2].item() == pytest.approx(torch.log_softmax(z, 0)[-1].item(), abs=1e-5)


def test_head_stays_float32_under_autocast():
    """The LM-head matmul ignores an enclosing bf16 autocast (the FSDP engine's on CUDA)."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(12, 32, generator=g)
    weight = torch.randn(50, 32, generator=g)
    labels = torch.randint(0, 50, (12,), generator=g)
    rows = RowSampling(torch.full((12,), 0.7), torch.full((12,), 10), torch.full((12,), 0.9))
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    want, want_ent = chunked_logprobs(h1, weight, labels, rows, 5)
    (want.sum() + want_ent.sum()).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_ent = chunked_logprobs(h2, weight, labels, rows, 5)
        (got.sum() + got_ent.sum()).backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_ent, want_ent, atol=1e-6, rtol=0)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=0)
