"""``WorkerGroupEngine.forward_logprobs``: each data-parallel rank receives only its rows (the
training split) and computes them in as many forwards as the other ranks; the controller
gathers the results in row order."""

from __future__ import annotations

import torch
from fsdp._helpers import make_batch

from areal_agents.trainers.placement import TrainPlacement
from areal_agents.trainers.row_shards import (
    gather_logprobs,
    shard_batch,
    shard_logprobs,
)
from areal_agents.trainers.step import rank_microbatches

BUDGET = 24


class RowEngine:
    """A model-free engine: a row's "log-probs" are its token ids plus ``offset``; it records
    the rows (as token-id tuples) of every ``forward_logprobs`` call."""

    token_budget = BUDGET

    def __init__(self, model=None, offset: float = 0.0, **kwargs):
        self.offset, self.calls = offset, []

    def forward_logprobs(self, batch):
        self.calls.append([tuple(r[m].tolist())
                           for r, m in zip(batch.input_ids, batch.attention_mask, strict=True)])
        return batch.input_ids.float() * batch.attention_mask + self.offset

    def close(self):
        pass


def _rows(batch, indices):
    return {tuple(batch.input_ids[i][batch.attention_mask[i]].tolist()) for i in indices}


def test_each_rank_computes_its_training_rows_in_as_many_forwards():
    batch = make_batch(num=7)
    placement = TrainPlacement(world_size=2)
    engines = [RowEngine(), RowEngine()]
    lengths = batch.attention_mask.sum(-1).tolist()

    def call_each(per_rank):
        for (shard, dp_rank, dp), _ in per_rank:  # only the shard's rows travel
            assert shard.rows == sorted({0, *(r for p in rank_microbatches(
                lengths, dp_rank, dp, 1 << 30) for r in p)})
            assert shard.batch.input_ids.shape[0] == len(shard.rows)
        return [shard_logprobs(engines[r], *args) for r, (args, _) in enumerate(per_rank)]

    got = gather_logprobs(batch, placement, call_each)
    torch.testing.assert_close(got, batch.input_ids.float() * batch.attention_mask,
                               rtol=0, atol=0)
    assert len(engines[0].calls) == len(engines[1].calls) >= 2  # in step (fillers)
    for rank, engine in enumerate(engines):
        trained = {row for plan in rank_microbatches(lengths, rank, 2, BUDGET) for row in plan}
        computed = set().union(*map(set, engine.calls))
        assert _rows(batch, trained) <= computed <= _rows(batch, trained | {0})


def test_without_a_token_budget_the_expanded_shard_is_computed_once():
    batch = make_batch(num=5)
    engine = RowEngine()
    engine.token_budget = None
    rows, values = shard_logprobs(engine, shard_batch(batch, 1, 2), 1, 2)
    assert len(engine.calls) == 1
    lengths = batch.attention_mask.sum(-1).tolist()
    assert rows == sorted(rank_microbatches(lengths, 1, 2, 1 << 30)[0])
    want = (batch.input_ids.float() * batch.attention_mask)[rows]
    torch.testing.assert_close(values, want[:, : values.shape[1]], rtol=0, atol=0)
