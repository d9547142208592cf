"""``pack_tensors``: a worker's exported weights in few flat pipe messages, bit for bit."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest
import torch

from areal_agents.trainers.tensor_pack import ALIGN, pack_tensors


def _named() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("embed", torch.randn(7, 5, generator=g)),
            ("half", torch.randn(3, 3, generator=g).to(torch.bfloat16)),
            ("ids", torch.arange(5, dtype=torch.int64)),
            ("mask", torch.tensor([True, False, True])),
            ("scalar", torch.tensor(2.5, dtype=torch.float64)),
            ("empty", torch.zeros(0, 4)),
            ("strided", torch.randn(4, 6, generator=g).t())]  # not contiguous


def _unpacked(packs) -> list[tuple[str, torch.Tensor]]:
    return [item for p in packs for item in p.unpack()]


def test_packs_round_trip_every_dtype_and_shape_bit_for_bit_in_order():
    named = _named()
    packs = list(pack_tensors(named, max_bytes=1 << 20))
    assert len(packs) == 1
    got = _unpacked(pickle.loads(cloudpickle.dumps(packs)))  # as through the pipe
    assert [n for n, _ in got] == [n for n, _ in named]
    for (_, want), (_, t) in zip(named, got, strict=True):
        assert t.dtype == want.dtype and t.shape == want.shape
        assert torch.equal(t, want)
    assert all(offset % ALIGN == 0 for _, _, _, offset in packs[0].entries)


def test_messages_hold_at_most_max_bytes_and_a_larger_tensor_travels_alone():
    named = [("a", torch.ones(10)), ("b", torch.ones(10)), ("big", torch.ones(100)),
             ("c", torch.ones(10))]  # 40, 40, 400, 40 bytes
    packs = list(pack_tensors(named, max_bytes=96))
    assert [[n for n, *_ in p.entries] for p in packs] == [["a", "b"], ["big"], ["c"]]
    assert [p.data.nbytes for p in packs] == [96, 400, 48]  # 40 -> 48 aligned, then 40
    assert [n for n, _ in _unpacked(packs)] == ["a", "b", "big", "c"]


def test_a_pack_copies_so_later_changes_to_the_source_do_not_leak_in():
    w = torch.zeros(4)
    (pack,) = pack_tensors([("w", w)], max_bytes=1024)
    w += 1  # the optimizer's next step
    assert next(pack.unpack())[1].tolist() == [0.0] * 4


def test_max_bytes_must_be_positive():
    with pytest.raises(ValueError, match=r"^max_bytes must be >= 1, got 0$"):
        list(pack_tensors([], max_bytes=0))


async def test_a_push_caps_a_worker_groups_pipe_messages_at_its_bucket():
    from areal_agents.trainers.placement import InferencePlacement
    from areal_agents.trainers.weight_push import WeightPush

    class Group:  # a WorkerGroupEngine's export side
        stream_bytes = 1 << 30

        def export_weights(self):
            yield "w", torch.ones(2)

    source = Group()
    update = await WeightPush(InferencePlacement(bucket_mb=1)).update(source, version=2)
    assert source.stream_bytes == 1 << 20  # the controller holds at most one bucket of it
    assert [(n, t.tolist()) for n, t in update.named_tensors] == [("w", [1.0, 1.0])]
