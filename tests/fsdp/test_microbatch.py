"""Token-budget micro-batches cover every row once, stay within the budget, bound padding;
with prompt keys (shared prompts) they keep each group's rows together."""

from __future__ import annotations

import pytest
import torch

from areal_agents.trainers.microbatch import (
    padding_waste,
    plan_microbatches,
    shared_cost,
    split_batch,
)
from areal_agents.trainers.shared_prefix import RowPrompts
from areal_agents.trainers.step import plan_rank_microbatches, rank_microbatches

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


def _groups(num_groups: int, size: int, seed: int = 0):
    """``num_groups`` prompts (5-12 tokens) x ``size`` rows with answers of 1-9 tokens:
    (lengths, RowPrompts), rows of a group interleaved with the other groups'."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(5, 13, (num_groups,), generator=g).tolist()
    group = [r % num_groups for r in range(num_groups * size)]
    lengths = [prompt[k] + int(torch.randint(1, 10, (1,), generator=g)) for k in group]
    return lengths, RowPrompts(group, [prompt[k] for k in group])


def test_grouped_plan_keeps_each_group_in_one_microbatch_within_budget():
    lengths, prompts = _groups(16, 4)
    plans = plan_microbatches(lengths, token_budget=120, prompts=prompts)
    assert sorted(i for p in plans for i in p) == list(range(len(lengths)))
    assert len(plans) > 3  # several micro-batches
    for p in plans:
        assert shared_cost(lengths, prompts, p) <= 120
        assert p == sorted(p, key=lambda i: (-lengths[i], i))  # longest first inside
    home = {}
    for k, p in enumerate(plans):
        for i in p:
            assert home.setdefault(prompts.group[i], k) == k  # one micro-batch per group
    # the length-only plan scatters groups: their prompts would run once per micro-batch
    scattered = plan_microbatches(lengths, token_budget=120)
    assert sum(len({prompts.group[i] for i in p}) for p in scattered) > 16


def test_a_group_over_the_budget_is_split_into_chunks_within_it():
    lengths = [20, 19, 18, 17, 16, 15]
    prompts = RowPrompts([0] * 6, [14] * 6)  # one prompt: cost 14 + rows * longest answer
    plans = plan_microbatches(lengths, token_budget=30, prompts=prompts)
    assert plans == [[0, 1], [2, 3, 4, 5]]
    assert [shared_cost(lengths, prompts, p) for p in plans] == [26, 30]
    assert plan_microbatches([40, 4, 4], 10, RowPrompts([0, 1, 1], [3, 2, 2])) == [[0], [1, 2]]


def test_costs_follow_the_engines_sharing_rule():
    prompts = RowPrompts([0, 1], [4, 4])
    assert shared_cost([6, 9], prompts, [0, 1]) == 18  # nothing shared: rows * longest
    assert shared_cost([6, 6], RowPrompts([0, 0], [0, 0]), [0, 1]) == 12  # empty prompts


def test_rank_plans_with_prompts_keep_the_ranks_rows_and_group_them():
    lengths, prompts = _groups(12, 4, seed=1)
    for rank in range(2):
        plain = rank_microbatches(lengths, rank, 2, 80)
        grouped = rank_microbatches(lengths, rank, 2, 80, prompts)
        assert sorted(i for p in grouped for i in p) == sorted(i for p in plain for i in p)
        home = {}
        for k, p in enumerate(grouped):
            assert shared_cost(lengths, prompts, p) <= 80
            for i in p:
                assert home.setdefault(prompts.group[i], k) == k
    slots = plan_rank_microbatches(lengths, 0, 2, 80, prompts=prompts)
    assert [s.rows for s in slots] == rank_microbatches(lengths, 0, 2, 80, prompts)
