"""``RowSampling`` and the log-prob head's argument handling, with exact messages: the parts of
``trainers/logprobs.py`` the numerical tests in tests/fsdp/test_logprobs.py do not pin."""

from __future__ import annotations

import pytest
import torch

from areal_agents.samples import TokenBatch
from areal_agents.trainers.logprobs import (
    RowSampling,
    as_row_sampling,
    chunked_logprobs,
    full_logprobs,
    sequence_logprobs,
)


def test_defaults_and_dtypes():
    rows = RowSampling(torch.tensor([0.5, 1]))
    assert rows.temperature.dtype == torch.float32 and rows.temperature.tolist() == [0.5, 1.0]
    assert rows.top_k.dtype == torch.long and rows.top_k.tolist() == [0, 0]
    assert rows.top_p.dtype == torch.float32 and rows.top_p.tolist() == [1.0, 1.0]
    given = RowSampling([1.0, 0.0], [3, 0], [0.5, 1.0])
    assert given.top_k.dtype == torch.long and given.top_k.tolist() == [3, 0]
    assert given.top_p.dtype == torch.float32 and given.top_p.tolist() == [0.5, 1.0]
    assert len(given) == 2


@pytest.mark.parametrize(("args", "message"), [
    ((torch.ones(2, 2),), "RowSampling.temperature must be 1-D [rows] (got shape (2, 2))"),
    ((torch.tensor(1.0),), "RowSampling.temperature must be 1-D [rows] (got shape ())"),
    ((torch.tensor([1.0, -0.5]),), "temperature must be >= 0 (0 = greedy), got [1.0, -0.5]"),
    ((torch.ones(2), torch.zeros(3)),
     "temperature, top_k and top_p need one entry per row (got shapes (2,), (3,), (2,))"),
    ((torch.ones(2), None, torch.ones(1)),
     "temperature, top_k and top_p need one entry per row (got shapes (2,), (2,), (1,))"),
])
def test_bad_rows_are_rejected(args, message):
    with pytest.raises(ValueError) as info:
        RowSampling(*args)
    assert str(info.value) == message


def test_uniform_of_to_getitem_expand():
    assert RowSampling.uniform(3, 0.5).temperature.tolist() == [0.5] * 3
    assert RowSampling.uniform(2).temperature.tolist() == [1.0, 1.0]
    rows = RowSampling([0.5, 1.0, 0.0], [1, 2, 3], [0.9, 0.8, 0.7])
    part = rows[torch.tensor([2, 0])]
    assert (part.temperature.tolist(), part.top_k.tolist()) == ([0.0, 0.5], [3, 1])
    assert part.top_p.tolist() == pytest.approx([0.7, 0.9])
    moved = rows.to("cpu")
    assert moved.top_k.tolist() == [1, 2, 3] and moved.top_p.tolist() == pytest.approx(
        [0.9, 0.8, 0.7])
    keep = torch.tensor([[True, False], [True, True], [False, True]])
    expanded = rows.expand(keep)
    assert expanded.temperature.tolist() == [0.5, 1.0, 1.0, 0.0]
    assert expanded.top_k.tolist() == [1, 2, 2, 3]
    assert expanded.top_p.tolist() == pytest.approx([0.9, 0.8, 0.8, 0.7])


def test_of_a_batch():
    ids = torch.zeros(2, 3, dtype=torch.long)
    batch = TokenBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                       loss_mask=torch.zeros_like(ids), old_logprobs=torch.zeros(2, 3),
                       advantages=torch.zeros(2, 3), versions=torch.zeros_like(ids),
                       rewards=torch.zeros(2))
    rows = RowSampling.of(batch)
    assert rows.temperature.tolist() == [1.0, 1.0] and not rows.filters
    batch.temperature = torch.tensor([0.5, 0.7])
    batch.top_k = torch.tensor([0, 4])
    batch.top_p = torch.tensor([0.9, 1.0])
    rows = RowSampling.of(batch)
    assert rows.temperature.tolist() == pytest.approx([0.5, 0.7])
    assert rows.top_k.tolist() == [0, 4]


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "filters"), [
    ([1.0], [0], [1.0], False), ([1.0], [2], [1.0], True), ([1.0], [0], [0.9], True),
    ([0.0], [2], [0.9], False), ([0.0, 1.0], [2, 0], [1.0, 0.5], True),
    ([0.0, 1.0], [2, 0], [1.0, 1.0], False),
])
def test_filters(temperature, top_k, top_p, filters):
    assert RowSampling(temperature, top_k, top_p).filters is filters


def test_as_row_sampling_forms():
    dev = torch.device("cpu")
    assert as_row_sampling(0.5, 3, dev).temperature.tolist() == [0.5] * 3
    assert as_row_sampling(2, 1, dev).temperature.tolist() == [2.0]
    assert as_row_sampling(torch.tensor([0.5, 1.0]), 2, dev).temperature.tolist() == [0.5, 1.0]
    rows = RowSampling.uniform(2, 0.3)
    assert as_row_sampling(rows, 2, dev).temperature.tolist() == pytest.approx([0.3, 0.3])
    with pytest.raises(ValueError) as info:
        as_row_sampling(torch.tensor([0.5, 1.0]), 3, dev)
    assert str(info.value) == "sampling parameters have 2 rows but the input has 3"


def test_argument_messages():
    h, w, y = torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError) as info:
        chunked_logprobs(h, w, y, 1.0, 0)
    assert str(info.value) == "chunk_size must be > 0 (got 0)"
    for bad in ((torch.zeros(2, 3, 1), w, y), (h, w, torch.zeros(3, dtype=torch.long)),
                (h, torch.zeros(4, 5), y)):
        with pytest.raises(ValueError) as info:
            chunked_logprobs(*bad)
        assert str(info.value) == (
            f"shape mismatch: hidden {tuple(bad[0].shape)} must be [n, h], labels "
            f"{tuple(bad[2].shape)} [n], weight {tuple(bad[1].shape)} [vocab, h]")


def test_values_on_a_hand_computed_row():
    # one row whose logits are log(0.5, 0.3, 0.15, 0.05): identity hidden, weight = logits
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    hidden, weight = torch.ones(1, 1), logits[:, None]
    lp, ent = chunked_logprobs(hidden, weight, torch.tensor([1]), 1.0)
    assert lp.item() == pytest.approx(torch.tensor(0.3).log().item(), abs=1e-6)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert ent.item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)
    # top-2: renormalised 0.625 / 0.375; the label 3 (filtered) is kept with its own mass
    rows = RowSampling([1.0], [2], [1.0])
    lp, ent = chunked_logprobs(hidden, weight, torch.tensor([1]), rows)
    assert lp.item() == pytest.approx(torch.tensor(0.375).log().item(), abs=1e-6)
    q = torch.tensor([0.625, 0.375])
    assert ent.item() == pytest.approx(-(q * q.log()).sum().item(), abs=1e-6)
    lp, _ = chunked_logprobs(hidden, weight, torch.tensor([3]), rows)
    assert lp.item() == pytest.approx(torch.tensor(0.05 / 0.85).log().item(), abs=1e-6)
    # greedy rows: temperature 1, nothing filtered
    lp, _ = chunked_logprobs(hidden, weight, torch.tensor([1]), RowSampling([0.0], [1], [0.1]))
    assert lp.item() == pytest.approx(torch.tensor(0.3).log().item(), abs=1e-6)


def test_unused_outputs_and_frozen_inputs_get_no_gradient():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, generator=g, requires_grad=True)
    weight = torch.randn(5, 4, generator=g)
    lp, _ = chunked_logprobs(hidden, weight, torch.tensor([0, 1, 2]), 0.7, 2)
    lp.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    w = weight.clone().requires_grad_()
    h = hidden.detach()
    _, ent = chunked_logprobs(h, w, torch.tensor([0, 1, 2]), 0.7, 2)
    ent.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0 and h.grad is None


def test_full_logprobs_masks_padding():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=g)
    ids = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    lp, ent = full_logprobs(logits, ids, mask, RowSampling([1.0, 0.5], [0, 2], [1.0, 1.0]))
    assert lp.shape == ent.shape == (2, 4)
    assert lp[:, 0].eq(0).all() and lp[1, 2:].eq(0).all() and ent[1, 2:].eq(0).all()
    manual = torch.log_softmax(logits[0, 1], -1)[ids[0, 2]]
    assert lp[0, 2].item() == pytest.approx(manual.item(), abs=1e-6)
    # identity LM head: the hidden states are the logits
    out_lp, out_ent = sequence_logprobs(logits, torch.eye(6), ids, mask,
                                        RowSampling([1.0, 0.5], [0, 2], [1.0, 1.0]), 1)
    torch.testing.assert_close(out_lp, lp)
    torch.testing.assert_close(out_ent, ent)


def test_inputs_are_converted_to_the_documented_dtypes():
    rows = RowSampling(torch.tensor([0.5, 1.0], dtype=torch.float64),
                       torch.tensor([2.0, 0.0]), torch.tensor([0.9, 1.0], dtype=torch.float64))
    assert (rows.temperature.dtype, rows.top_k.dtype, rows.top_p.dtype) == (
        torch.float32, torch.long, torch.float32)
    assert rows.top_k.tolist() == [2, 0]


def test_of_a_batch_keeps_top_p():
    ids = torch.zeros(2, 3, dtype=torch.long)
    batch = TokenBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                       loss_mask=torch.zeros_like(ids), old_logprobs=torch.zeros(2, 3),
                       versions=torch.zeros_like(ids), rewards=torch.zeros(2),
                       temperature=torch.tensor([1.0, 1.0]), top_k=torch.tensor([0, 0]),
                       top_p=torch.tensor([0.5, 1.0]))
    rows = RowSampling.of(batch)
    assert rows.top_p.tolist() == [0.5, 1.0] and rows.filters


@pytest.mark.parametrize(("top_k", "top_p", "expected"), [
    (0, 0.7, 0.3 / 0.8),  # top-p alone keeps 0.5 and 0.3
    (2, 0.99, 0.3 / 0.8),  # top-k 2 with a top-p that keeps both
    (0, 1.0, 0.3),
])
def test_filtering_rows_are_detected_for_every_parameter(top_k, top_p, expected):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    lp, _ = chunked_logprobs(torch.ones(1, 1), logits[:, None], torch.tensor([1]),
                             RowSampling([1.0], [top_k], [top_p]))
    assert lp.item() == pytest.approx(torch.tensor(expected).log().item(), abs=1e-6)


def test_default_sampling_is_temperature_1():
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(2, 3, 4, generator=g), torch.randn(7, 4, generator=g)
    ids = torch.randint(0, 7, (2, 3), generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    lp, ent = chunked_logprobs(hidden[0], weight, ids[0])
    ref_lp, ref_ent = chunked_logprobs(hidden[0], weight, ids[0], 1.0)
    torch.testing.assert_close((lp, ent), (ref_lp, ref_ent))
    seq = sequence_logprobs(hidden, weight, ids, mask)
    torch.testing.assert_close(seq, sequence_logprobs(hidden, weight, ids, mask, 1.0))
    full = full_logprobs(hidden @ weight.t(), ids, mask)
    torch.testing.assert_close(full, full_logprobs(hidden @ weight.t(), ids, mask, 1.0))
    manual = torch.log_softmax(hidden[0, 0] @ weight.t(), -1)[ids[0, 1]]
    assert seq[0][0, 1].item() == pytest.approx(manual.item(), abs=1e-5)
    assert full[0][0, 1].item() == pytest.approx(manual.item(), abs=1e-5)


def test_no_rows_gives_zero_weight_gradient():
    weight = torch.randn(5, 3, requires_grad=True)
    hidden = torch.zeros(0, 3, requires_grad=True)
    lp, ent = chunked_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(weight.grad, torch.zeros(5, 3))
