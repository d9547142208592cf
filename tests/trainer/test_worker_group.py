"""Worker groups: row shards (pure), picklable losses, and ``WorkerGroupEngine`` /
``DistributedEngineGroup`` against one process, failures, deaths and timeouts."""

from __future__ import annotations

import os
import pickle
import random
import threading
import time

import pytest
import torch
import torch.distributed as dist
from fsdp._helpers import make_batch, make_model, ppo_loss

from areal_agents.algorithms.registry import ALGORITHMS, resolve
from areal_agents.errors import ConfigError, TrainError
from areal_agents.samples import TokenBatch
from areal_agents.trainers.launcher import DistributedEngineGroup
from areal_agents.trainers.placement import TrainPlacement
from areal_agents.trainers.row_shards import (
    gather_logprobs,
    shard_batch,
    shard_logprobs,
    shard_rows,
)
from areal_agents.trainers.step import rank_microbatches
from areal_agents.trainers.worker_group import WorkerGroupEngine


def _assert_same_rows(got: TokenBatch, want: TokenBatch) -> None:
    for name, value in vars(want).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(got, name), value), name
        else:
            assert getattr(got, name) == value, name


@pytest.mark.parametrize("seed", range(20))
def test_shard_rows_are_the_planners_rows_for_any_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 17))]
    dp = rng.randint(1, 4)
    for dp_rank in range(dp):
        rows = shard_rows(lengths, dp_rank, dp)
        for budget in (1, 16, 64, 10_000):
            planned = {i for mb in rank_microbatches(lengths, dp_rank, dp, budget) for i in mb}
            assert planned | {0} == set(rows)


def test_shard_rows_errors():
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, dp=2\), got 2"):
        shard_rows([3, 4], 2, 2)
    with pytest.raises(ValueError, match="a train step needs at least one sequence"):
        shard_rows([], 0, 1)


@pytest.mark.parametrize("dp", [2, 3])
def test_expanded_shard_gives_every_micro_batch_bit_for_bit(dp):
    batch = make_batch(num=7, temperature=0.7)
    batch.stat_weights = batch.loss_weights
    lengths = batch.attention_mask.sum(-1).tolist()
    for dp_rank in range(dp):
        shard = shard_batch(batch, dp_rank, dp)
        assert shard.batch.batch_size == len(shard.rows) < batch.batch_size
        full = shard.expand()
        assert full.input_ids.shape == batch.input_ids.shape
        assert full.num_tokens == batch.num_tokens
        assert full.attention_mask.sum(-1).tolist() == lengths
        for mb in [*rank_microbatches(lengths, dp_rank, dp, 24), [0]]:  # [0]: the filler
            _assert_same_rows(full.select(mb), batch.select(mb))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_loss_pickles(name):
    loss = pickle.loads(pickle.dumps(resolve(name).loss))
    assert type(loss.__self__).__name__ == type(resolve(name)).__name__


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than 2 GPUs")
def test_cuda_placement_needs_a_gpu_per_rank():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError) as info:
        WorkerGroupEngine(make_model(), TrainPlacement(world_size=2, device="cuda"))
    assert str(info.value) == (f"Policy.train: device='cuda' with world_size=2 needs one GPU per "
                               f"rank, {count} visible; lower world_size or use device='cpu'")


# ---- multi-process ------------------------------------------------------------------------------

class Worker:
    """A model-free engine for the group's failure paths (module level: workers unpickle it)."""

    def rank(self) -> int:
        return dist.get_rank()

    def threads(self) -> int:
        return torch.get_num_threads()

    def boom(self, rank: int) -> int:
        if dist.get_rank() == rank:
            raise RuntimeError(f"boom on rank {rank}")
        dist.barrier()  # the other ranks wait for the failed one in a collective
        return 0

    def die(self, rank: int) -> None:
        if dist.get_rank() == rank:
            os._exit(3)
        dist.barrier()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def logprobs(self, shard, dp_rank: int, dp: int):
        return shard_logprobs(GlooRowEngine(), shard, dp_rank, dp)

    def items(self, n: int):
        for i in range(n):
            dist.barrier()  # each step is a collective, as in export_weights
            yield i * 10 + dist.get_rank()


class GlooRowEngine:
    """A model-free engine on a worker rank: a row's "log-probs" are its token ids plus 1000 *
    rank (who computed it); a barrier per call, like FSDP's collective forward (unequal call
    counts would hang)."""

    token_budget = 24

    def forward_logprobs(self, batch):
        dist.barrier()
        return batch.input_ids.float() * batch.attention_mask + 1000.0 * dist.get_rank()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_group_failures_never_hang():
    group = DistributedEngineGroup(2, Worker, threads=2, grace=2.0, timeout=30.0)
    try:
        assert group.call("rank") == [0, 1]
        assert group.call("threads") == [2, 2]
        # a blocking call releases the GIL: this thread keeps running while another waits
        waiting = threading.Thread(target=group.call, args=("sleep", 1.0))
        ticks = 0
        waiting.start()
        while waiting.is_alive():
            ticks += 1
        assert ticks > 10_000
        assert list(group.stream("items", 3)) == [0, 10, 20]  # rank 0's items only
        stream = group.stream("items", 4)
        assert next(stream) == 0
        stream.close()  # abandoned: the rest is drained, the group stays usable
        assert group.call_each("rank", [((), {}), ((), {})]) == [0, 1]
        # forward_logprobs: each rank gets its rows and computes them (barrier per forward)
        batch = make_batch(num=7)
        got = gather_logprobs(batch, TrainPlacement(world_size=2),
                              lambda per_rank: group.call_each("logprobs", per_rank))
        lengths = batch.attention_mask.sum(-1).tolist()
        values = batch.input_ids.float() * batch.attention_mask
        for rank in (0, 1):
            for row in rank_microbatches(lengths, rank, 2, 1 << 30)[0]:
                mask = batch.attention_mask[row]
                assert torch.equal(got[row][mask], values[row][mask] + 1000.0 * rank), row
        t0 = time.monotonic()
        with pytest.raises(TrainError) as info:
            group.call("boom", 1)
        assert time.monotonic() - t0 < 25
        message = str(info.value)
        assert message.startswith("engine rank 1 failed:\nTraceback (most recent call last):")
        assert "RuntimeError: boom on rank 1" in message
        assert message.endswith("(ranks [0] did not answer within 2.0 s; the worker group was "
                                "stopped)")
        with pytest.raises(TrainError, match=r"the worker group was stopped \(ranks \[0\] stopped "
                                             r"answering boom\); build a new one"):
            group.call("rank")
    finally:
        group.close()
        group.close()

    group = DistributedEngineGroup(2, Worker, grace=2.0, timeout=2.0)
    try:
        with pytest.raises(TrainError, match=r"^engine rank 1 failed:\nworker process exited \(exit "
                                             r"code 3\) without a reply"):
            group.call("die", 1)
    finally:
        group.close()

    group = DistributedEngineGroup(2, Worker, grace=2.0, timeout=2.0)
    try:
        with pytest.raises(TrainError, match=r"^engine ranks \[0, 1\] gave no reply to sleep within "
                                             r"2.0 s; the worker group was stopped$"):
            group.call("sleep", 60)
    finally:
        group.close()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_worker_group_engine_matches_one_process(tmp_path):
    from areal_agents.trainers.fsdp.engine import FSDPEngine

    torch.set_num_threads(1)
    batch = make_batch(num=7)
    engine = WorkerGroupEngine(make_model(), TrainPlacement(world_size=2), lr=1e-3,
                               token_budget=24)
    try:
        got = [engine.train_step(batch, ppo_loss) for _ in range(2)]
        weights = dict(engine.export_weights())
        packs = list(engine._group.stream("export_packed", 1 << 30))  # rank 0's messages
        assert len(packs) == 1  # the whole model in one message (one per tensor before)
        assert [n for n, _ in packs[0].unpack()] == list(weights)
        engine.stream_bytes = 4096  # many small messages: the same tensors, bit for bit
        small = dict(engine.export_weights())
        assert small.keys() == weights.keys()
        assert all(torch.equal(small[n], weights[n]) for n in weights)
        logprobs = engine.forward_logprobs(batch)
        engine.version = 5
        engine.save(str(tmp_path / "ckpt"))
        engine.step, engine.version = 0, 0
        engine.load(str(tmp_path / "ckpt"))
        assert (engine.step, engine.version) == (2, 5)
    finally:
        engine.close()
        engine.close()
    single = FSDPEngine(make_model(), lr=1e-3, token_budget=24)
    want = [single.train_step(batch, ppo_loss) for _ in range(2)]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-6)
        assert g["entropy"] == pytest.approx(w["entropy"], abs=1e-5)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)
    want_weights = dict(single.export_weights())
    assert weights.keys() == want_weights.keys()
    for name, w in want_weights.items():
        torch.testing.assert_close(weights[name], w, atol=1e-4, rtol=1e-4)  # Adam: ~1e-5 noise
    torch.testing.assert_close(logprobs, single.forward_logprobs(batch), atol=1e-5, rtol=1e-5)


def test_packed_batches_and_row_shards_cross_a_pipe_unchanged():
    from areal_agents.trainers.row_shards import PackedBatch

    batch = make_batch(num=5, temperature=0.7)
    batch.prox_logprobs = batch.old_logprobs * 0.5
    batch.top_k = torch.arange(5)
    data = pickle.dumps(PackedBatch.of(batch))
    assert len(data) < len(pickle.dumps(batch))
    back = pickle.loads(data).unpack()
    _assert_same_rows(back, batch)
    assert back.values is None and back.advantages.dtype == batch.advantages.dtype
    shard = shard_batch(batch, 1, 2)
    again = pickle.loads(pickle.dumps(shard))
    assert (again.rows, again.lengths, again.width) == (shard.rows, shard.lengths, shard.width)
    _assert_same_rows(again.batch, shard.batch)
    _assert_same_rows(again.expand(), shard.expand())
