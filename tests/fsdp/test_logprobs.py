"""Chunked log-probs/entropy equal the full log-softmax, with gradients, at any temperature."""

from __future__ import annotations

import pytest
import torch
from areal_agents.trainers.logprobs import chunked_logprobs, full_logprobs, sequence_logprobs


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
    with pytest.raises(ValueError, match="temperature"):
        chunked_logprobs(h, w, y, 0.0)
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
