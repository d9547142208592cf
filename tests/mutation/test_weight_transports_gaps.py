"""Shared-memory transport details the weight-transport mutation run left untested: the
constructor's bounds, message and data alignment, the default timeouts and copies on the
receiving side, the poll loop's deadline and back-off, and the receiver's resource-tracker
release (see docs/mutation_testing.md)."""

from __future__ import annotations

import os
import threading
import types

import pytest
import torch

from areal_agents.errors import WeightSyncError
from areal_agents.trainers import weight_shm
from areal_agents.trainers.weight_shm import MAX_READERS, SharedMemoryTransport, receive_shared
from areal_agents.trainers.weight_transport import receive


class FakeClock:
    """Stands in for the ``time`` module in ``weight_shm``: each ``monotonic()`` call advances
    by ``step`` seconds; ``sleep`` only records its argument."""

    def __init__(self, step: float) -> None:
        self.now, self.step, self.sleeps = 0.0, step, []

    def monotonic(self) -> float:
        value = self.now
        self.now += self.step
        return value

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


@pytest.fixture
def clock(monkeypatch):
    def install(step: float) -> FakeClock:
        fake = FakeClock(step)
        monkeypatch.setattr(weight_shm, "time", types.SimpleNamespace(
            monotonic=fake.monotonic, sleep=fake.sleep))
        return fake

    return install


@pytest.mark.parametrize(("bucket_bytes", "num_readers"), [(0, 1), (8, 0), (8, MAX_READERS + 1)])
def test_shm_constructor_bounds_name_both_values(bucket_bytes, num_readers):
    with pytest.raises(ValueError) as info:
        SharedMemoryTransport(bucket_bytes, num_readers=num_readers)
    assert str(info.value) == (f"need bucket_bytes >= 1 and 1 <= num_readers <= {MAX_READERS} "
                               f"(got {bucket_bytes}, {num_readers})")


def test_shm_constructor_accepts_the_bounds_and_defaults_to_600_s():
    with SharedMemoryTransport(1, num_readers=MAX_READERS, meta_bytes=64) as shm:
        assert (shm.bucket_bytes, shm.num_readers, shm.timeout) == (1, MAX_READERS, 600.0)


@pytest.mark.parametrize(("meta_bytes", "offset"), [(1, 576), (64, 576), (65, 640), (300, 832)])
def test_shm_data_starts_at_the_next_64_byte_boundary_after_header_and_metadata(meta_bytes,
                                                                                 offset):
    # header: 64 words of 8 bytes = 512; then meta_bytes, rounded up to a multiple of 64
    with SharedMemoryTransport(8, meta_bytes=meta_bytes) as shm:
        assert shm.manifest()["data_offset"] == offset


def test_receivers_wait_600_s_by_default(clock):
    with SharedMemoryTransport(4, timeout=1.0) as shm:
        manifest = shm.manifest()
        clock(step=1000.0)  # the first poll is already past any deadline
        for stream in (receive_shared(manifest), receive(manifest)):
            with pytest.raises(WeightSyncError) as info:
                next(stream)
            assert str(info.value) == ("shared-memory weight transfer: no bucket 1 arrived "
                                       "within 600.0 s")


@pytest.mark.parametrize("receiver", [receive_shared, receive])
def test_receivers_yield_copies_by_default(receiver):
    """Each tensor is yielded as a fresh tensor (three storages), not a view of the block (one
    storage, whose values must not be read once the stream has ended: the block is unmapped)."""
    with SharedMemoryTransport(4, timeout=30) as shm:
        stream = receiver(shm.manifest())
        sender = threading.Thread(
            target=shm.send, args=([(f"t{i}", torch.full((1,), float(i))) for i in range(3)],))
        sender.start()
        try:
            got = [(n, t.tolist(), t, t.untyped_storage().data_ptr()) for n, t in stream]
        finally:  # never close the block under a running sender
            sender.join()
        assert [(n, v) for n, v, _, _ in got] == [("t0", [0.0]), ("t1", [1.0]), ("t2", [2.0])]
        num_storages = len({ptr for _, _, _, ptr in got})  # the tensors are kept alive in got
        assert num_storages == 3


def test_wait_raises_only_after_the_deadline(clock):
    fake = clock(step=10.0)  # deadline 10; the next reading is exactly 10: not past it yet
    calls = []
    with pytest.raises(WeightSyncError) as info:
        weight_shm._wait(lambda: calls.append(1), 10.0, "x")
    assert str(info.value) == "shared-memory weight transfer: x within 10.0 s"
    assert (len(calls), fake.sleeps) == (2, [2e-5])


def test_wait_backs_off_doubling_from_20_us_to_1_ms(clock):
    fake = clock(step=1.0)
    answers = iter([None] * 9 + ["ready"])
    assert weight_shm._wait(lambda: next(answers), 100.0, "x") == "ready"
    assert fake.sleeps == pytest.approx([2e-5, 4e-5, 8e-5, 1.6e-4, 3.2e-4, 6.4e-4, 1e-3, 1e-3,
                                         1e-3])


def test_a_receiver_in_another_process_releases_the_block_from_its_resource_tracker(
        monkeypatch):
    """The sender owns the block: a receiver in another process (another pid in the manifest)
    unregisters it so that its exit does not unlink it; the sender's own process does not."""
    from multiprocessing import resource_tracker

    calls = []
    monkeypatch.setattr(resource_tracker, "unregister", lambda *args: calls.append(args))
    with SharedMemoryTransport(4, timeout=0.2) as shm:
        manifest = shm.manifest()
        receive_shared(manifest).close()
        assert calls == []
        receive_shared({**manifest, "pid": os.getpid() + 1}).close()
        assert calls == [("/" + shm.block.name, "shared_memory")]


@pytest.mark.parametrize("borrow", [False, True])
def test_shm_tensors_larger_than_a_bucket_arrive_whole_in_pieces(borrow):
    """8-byte buckets: 28 bytes go in pieces of 8, 8, 8 and 4, a [2, 3] int16 tensor in 8 and 4,
    between tensors that fit; values, dtypes and shapes arrive intact (borrowed views are
    read while the stream runs). The sender is joined before the block is closed."""
    sent = [("a", torch.arange(2, dtype=torch.float32)),
            ("big", torch.arange(7, dtype=torch.float32) + 0.5),
            ("grid", torch.arange(6, dtype=torch.int16).reshape(2, 3) - 3),
            ("c", torch.tensor([5.0], dtype=torch.float64))]
    with SharedMemoryTransport(8, timeout=5) as shm:
        stream = receive(shm.manifest(), timeout=5, borrow=borrow)
        errors: list[BaseException] = []

        def send() -> None:
            try:
                shm.send(sent)
            except BaseException as exc:  # checked below
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            got = [(n, t.dtype, tuple(t.shape), t.tolist()) for n, t in stream]
        finally:  # never close the block under a running sender
            sender.join()
    assert errors == []
    assert got == [(n, t.dtype, tuple(t.shape), t.tolist()) for n, t in sent]


def test_shm_metadata_estimate_adds_up_over_a_bucket():
    """Short entries (estimate 2 + 60 + 12 = 74 bytes each) in a 160-byte metadata area: two
    per bucket. Counting only the last entry's estimate would put all ten in one bucket, whose
    JSON does not fit the area."""
    sent = [(f"t{i}", torch.full((1,), float(i))) for i in range(10)]
    with SharedMemoryTransport(4096, meta_bytes=160, timeout=5) as shm:
        stream = receive(shm.manifest(), timeout=5)
        errors: list[BaseException] = []

        def send() -> None:
            try:
                shm.send(sent)
            except BaseException as exc:  # checked below
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            got = [(n, t.tolist()) for n, t in stream]
        finally:  # never close the block under a running sender
            sender.join()
    assert errors == []
    assert got == [(n, t.tolist()) for n, t in sent]
