"""Token-budget micro-batches cover every row once, stay within the budget, bound padding."""

from __future__ import annotations

import pytest
import torch

from areal_agents.trainers.microbatch import padding_waste, plan_microbatches, split_batch

from ._helpers import make_batch


def test_plan_covers_each_index_once_within_budget():
    lengths = [5, 17, 3, 9, 9, 30, 2, 16]
    plans = plan_microbatches(lengths, token_budget=32)
    assert sorted(i for p in plans for i in p) == list(range(len(lengths)))
    for p in plans:
        assert len(p) * max(lengths[i] for i in p) <= 32
    assert plans[0] == [5]  # longest first; 30 + another 30-wide row would exceed 32
    assert plans == [[5], [1], [7, 3], [4, 0, 2], [6]]


def test_oversized_sequence_gets_its_own_microbatch():
    assert plan_microbatches([100, 4, 4], token_budget=10) == [[0], [1, 2]]


def test_length_grouping_bounds_padding():
    lengths = [1, 64] * 8  # alternating: naive order would pad every short row to 64
    plans = plan_microbatches(lengths, token_budget=128)
    assert padding_waste(lengths, plans) == 0.0
    assert padding_waste(lengths[:2], [[0, 1]]) == pytest.approx(1 - 65 / 128)


def test_split_batch_trims_and_preserves_rows():
    batch = make_batch(num=6)
    mbs = split_batch(batch, token_budget=24)
    assert sum(mb.batch_size for mb in mbs) == 6
    for mb in mbs:
        assert mb.input_ids.numel() <= 24
        assert mb.attention_mask[:, -1].any()  # trimmed to its own longest row
    all_rows = {tuple(r[m].tolist()) for mb in mbs for r, m in zip(mb.input_ids, mb.attention_mask, strict=True)}
    assert all_rows == {tuple(r[m].tolist()) for r, m in zip(batch.input_ids, batch.attention_mask, strict=True)}


def test_rejects_bad_budget():
    with pytest.raises(ValueError, match="token_budget"):
        plan_microbatches([1], 0)
    assert plan_microbatches([], 8) == []
    assert torch.is_tensor(make_batch().input_ids)
