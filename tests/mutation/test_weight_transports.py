"""Weight-transport details the mutation run found untested: manifests, the in-process
channel's timeouts and messages on both sides, closing, the nccl refusal, and push_to_engine
with a receiver that is not a generator or an engine that stops reading early."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from areal_agents.errors import WeightSyncError
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.weight_shm import SharedMemoryTransport
from areal_agents.trainers.weight_transport import (
    DiskTransport,
    TensorTransport,
    push_to_engine,
    receive,
)


def four_byte_tensors(n: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.full((1,), float(i))) for i in range(n)]


def test_manifests_name_their_fields(tmp_path):
    a, b = TensorTransport(bucket_bytes=64), TensorTransport(bucket_bytes=64)
    manifest = a.manifest()
    assert manifest == {"kind": "tensors", "channel": manifest["channel"], "bucket_bytes": 64}
    assert isinstance(manifest["channel"], str) and manifest["channel"] != b.manifest()["channel"]
    assert (a.timeout, a.bucket_bytes) == (600.0, 64)
    assert DiskTransport(tmp_path / "w", bucket_bytes=32).manifest() == {
        "kind": "disk", "path": str(tmp_path / "w"), "bucket_bytes": 32}
    a.close()
    b.close()


def test_a_sender_whose_receiver_never_comes_raises_after_its_timeout():
    transport = TensorTransport(bucket_bytes=4, timeout=0.2)  # one tensor per bucket
    transport.manifest()
    with pytest.raises(WeightSyncError) as info:
        transport.send(four_byte_tensors(3))  # 2 fit the queue (a bucket + the end marker)
    assert str(info.value) == ("the receiver took no bucket within 0.2 s; is receive(manifest) "
                               "being iterated in another thread?")
    transport.close()


def test_a_failing_source_without_a_receiver_raises_its_own_error():
    """The queue is full and nobody reads: the sender waits at most a second to hand over the
    abort marker (not its 600 s timeout), then raises the source's error (it raised a
    misleading "the receiver took no bucket within 600.0 s" before)."""

    def source() -> Iterator[tuple[str, torch.Tensor]]:
        yield from four_byte_tensors(3)  # buckets 1 and 2 fill the queue; 3 is pending
        raise RuntimeError("export failed")

    transport = TensorTransport(bucket_bytes=4)  # timeout 600 s
    transport.manifest()
    with pytest.raises(RuntimeError) as info:
        transport.send(source())
    assert str(info.value) == "export failed"
    transport.close()


def test_a_receiver_whose_sender_never_comes_raises_after_its_timeout():
    transport = TensorTransport(bucket_bytes=4, timeout=0.2)
    stream = transport.receive(transport.manifest())
    with pytest.raises(WeightSyncError) as info:
        next(stream)
    assert str(info.value) == "no bucket arrived within 0.2 s"
    transport.close()


def test_a_closed_channel_is_gone_and_close_is_idempotent():
    transport = TensorTransport(bucket_bytes=4)
    manifest = transport.manifest()
    transport.close()
    transport.close()
    with pytest.raises(WeightSyncError) as info:
        receive(manifest)
    assert str(info.value) == (f"no TensorTransport channel {manifest['channel']!r} in this "
                               "process; in-process tensors cannot cross processes (use shm)")


class _Fake:
    """A transport of another kind: the manifest says ``kind``; ``receive`` returns a plain
    iterator (no ``close``)."""

    bucket_bytes = 64

    def __init__(self, kind: str) -> None:
        self.kind, self.sent = kind, []

    def manifest(self):
        return {"kind": self.kind}

    def send(self, named_tensors):
        self.sent = list(named_tensors)
        return 4 * len(self.sent)

    def receive(self, manifest):
        return iter(four_byte_tensors(2))

    def close(self):
        pass


class _Reader(ScriptedEngine):
    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__(["x"])
        self.stop_after, self.names = stop_after, []

    async def update_weights(self, update):
        for name, _ in update.named_tensors:
            self.names.append(name)
            if len(self.names) == self.stop_after:
                return  # stops reading early, without an error
        self.version = update.version


async def test_push_to_engine_refuses_nccl_with_the_reason():
    with pytest.raises(ValueError) as info:
        await push_to_engine(_Reader(), _Fake("nccl"), four_byte_tensors(2))
    assert str(info.value) == ("push_to_engine runs both sides in this process; with nccl the "
                               "engine's ranks call NCCLTransport.receive() while rank src calls "
                               "send()")


async def test_push_to_engine_takes_a_receiver_that_is_a_plain_iterator():
    engine, transport = _Reader(), _Fake("custom")
    assert await push_to_engine(engine, transport, four_byte_tensors(2), version=4) == 8
    assert (engine.names, engine.version) == (["t0", "t1"], 4)


@pytest.mark.parametrize("kind", ["tensors", "shm"])
async def test_an_engine_that_stops_reading_early_makes_the_push_fail(kind):
    transport = (TensorTransport(bucket_bytes=4) if kind == "tensors"
                 else SharedMemoryTransport(bucket_bytes=4))
    engine = _Reader(stop_after=1)
    with pytest.raises(WeightSyncError) as info:
        await push_to_engine(engine, transport, four_byte_tensors(6), version=1)
    transport.close()
    assert "stopped before the update was complete" in str(info.value)
    assert engine.names == ["t0"] and engine.version != 1


def test_shm_round_trip_with_two_readers_in_threads():
    shm = SharedMemoryTransport(bucket_bytes=8, num_readers=2, timeout=30)
    manifests = [shm.manifest(0), shm.manifest(1)]
    got: list[list[str]] = [[], []]

    def read(r: int) -> None:
        got[r] = [n for n, _ in receive(manifests[r], timeout=30)]

    readers = [threading.Thread(target=read, args=(r,)) for r in (0, 1)]
    for t in readers:
        t.start()
    assert shm.send(four_byte_tensors(5)) == 20
    for t in readers:
        t.join()
    shm.close()
    assert got == [["t0", "t1", "t2", "t3", "t4"]] * 2


# ---- shared memory --------------------------------------------------------------------------


def shm_round_trip(shm: SharedMemoryTransport, named, manifest=None, receiver=None):
    """Send in a thread; return what ``receiver`` (default ``receive``) yields, as copies
    taken when each tensor is yielded and the tensors themselves."""
    manifest = manifest or shm.manifest()
    stream = (receiver or receive)(manifest)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            shm.send(named)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        got = [(n, t.clone(), t) for n, t in stream]
    finally:  # never close the block under a running sender (that crashes the process)
        sender.join()
    if errors:
        raise errors[0]
    return got


def test_shm_manifest_epochs_and_reader_bounds():
    with SharedMemoryTransport(bucket_bytes=64, num_readers=2) as shm:
        first, second = shm.manifest(0), shm.manifest(1)
        assert first == {"kind": "shm", "block": shm.block.name, "pid": first["pid"],
                         "epoch": 1, "reader": 0, "meta_bytes": 2**20,
                         "data_offset": first["data_offset"], "bucket_bytes": 64}
        assert (second["epoch"], second["reader"]) == (1, 1)
        assert [shm.manifest(0)["epoch"] for _ in range(2)] == [2, 3]
        with pytest.raises(ValueError) as info:
            shm.manifest(2)
        assert str(info.value) == "reader must be in [0, 2) (got 2)"
        with pytest.raises(WeightSyncError) as info:
            next(receive(first))
        assert str(info.value) == ("stale shared-memory manifest (update 1, the block holds "
                                   "update 3)")


def test_shm_timeouts_name_what_was_missing():
    with SharedMemoryTransport(bucket_bytes=4, timeout=0.2) as shm:
        manifest = shm.manifest()
        with pytest.raises(WeightSyncError) as info:
            next(shm.receive(manifest))  # the transport's own timeout, not 600 s
        assert str(info.value) == ("shared-memory weight transfer: no bucket 1 arrived within "
                                   "0.2 s")
    with SharedMemoryTransport(bucket_bytes=4, timeout=0.2) as shm:
        shm.manifest()
        with pytest.raises(WeightSyncError) as info:
            shm.send(four_byte_tensors(2))  # nobody copies bucket 1
        assert str(info.value) == ("shared-memory weight transfer: the receivers did not copy "
                                   "bucket 1 within 0.2 s")


def test_shm_receiver_of_an_aborted_update_says_so():
    def source():
        yield from four_byte_tensors(1)
        raise RuntimeError("export failed")

    with SharedMemoryTransport(bucket_bytes=64, timeout=10) as shm:
        with pytest.raises(WeightSyncError) as info:
            shm_round_trip(shm, source())
        assert str(info.value) == "the sender aborted the update; discard what was received"


def test_shm_close_twice_and_one_byte_tensors_do_not_overlap():
    shm = SharedMemoryTransport(bucket_bytes=256, timeout=10)
    sent = [(f"b{i}", torch.tensor([i + 1], dtype=torch.uint8)) for i in range(3)]
    got = shm_round_trip(shm, sent)
    assert [(n, c.tolist()) for n, c, _ in got] == [("b0", [1]), ("b1", [2]), ("b2", [3])]
    shm.close()
    shm.close()


def test_shm_transport_receive_copies_by_default():
    """``SharedMemoryTransport.receive`` yields copies: a tensor keeps its values after later
    buckets are written over the block."""
    with SharedMemoryTransport(bucket_bytes=4, timeout=10) as shm:
        got = shm_round_trip(shm, four_byte_tensors(3), receiver=shm.receive)
    assert [t.tolist() for _, _, t in got] == [[0.0], [1.0], [2.0]]


def test_shm_borrowed_tensors_are_views_of_the_block_and_may_be_kept():
    with SharedMemoryTransport(bucket_bytes=256, timeout=10) as shm:
        manifest = shm.manifest()
        got = shm_round_trip(shm, four_byte_tensors(3), manifest,
                             receiver=lambda m: receive(m, borrow=True))
        # one storage: the receiver's mapping of the block (not a fresh tensor each)
        assert len({t.untyped_storage().data_ptr() for _, _, t in got}) == 1
        assert [c.tolist() for _, c, _ in got] == [[0.0], [1.0], [2.0]]
        del got  # views kept past the stream's end: the receiver did not raise


def test_shm_metadata_bound_closes_buckets_early():
    """With little room for metadata, buckets close before the data area is full: every
    entry's JSON still fits (4-d shapes and long names need more than short ones)."""
    sent = [(f"layer.{i}." + "x" * 40, torch.full((1, 1, 1, 1), float(i))) for i in range(12)]
    with SharedMemoryTransport(bucket_bytes=4096, meta_bytes=300, timeout=10) as shm:
        got = shm_round_trip(shm, sent)
    assert [(n, c.flatten().tolist()) for n, c, _ in got] == [
        (n, t.flatten().tolist()) for n, t in sent]


def test_shm_long_metadata_is_read_whole():
    """One bucket of 64 tensors with long names: its JSON is far longer than the header."""
    sent = [(f"model.layers.{i}." + "w" * 200, torch.full((1,), float(i))) for i in range(64)]
    with SharedMemoryTransport(bucket_bytes=64 * 64, timeout=10) as shm:
        got = shm_round_trip(shm, sent)
    assert [(n, c.tolist()) for n, c, _ in got] == [(n, t.tolist()) for n, t in sent]


def test_disk_transport_receive_reads_the_directory_in_order(tmp_path):
    disk = DiskTransport(tmp_path / "w", bucket_bytes=8)
    assert disk.send(four_byte_tensors(5)) == 20
    got = [(n, t.tolist()) for n, t in disk.receive(disk.manifest())]
    assert got == [(f"t{i}", [float(i)]) for i in range(5)]
    disk.close()  # nothing to release: the directory stays
    assert sorted(p.name for p in (tmp_path / "w").iterdir())[-1] == "model.safetensors.index.json"


def test_receive_messages_and_timeouts(tmp_path):
    with pytest.raises(ValueError) as info:
        receive({"kind": "smoke"})
    assert str(info.value) == ("unknown transport kind 'smoke'; expected one of tensors, shm, "
                               "disk (nccl: NCCLTransport.receive)")
    with pytest.raises(WeightSyncError) as info:
        receive({"kind": "disk", "path": str(tmp_path / "missing")})
    assert str(info.value) == (f"no weight directory at {str(tmp_path / 'missing')!r}; was it "
                               "sent (DiskTransport.send) and is it on this host's filesystem?")
    tensors = TensorTransport(bucket_bytes=4)  # its own timeout is 600 s: receive's wins
    with pytest.raises(WeightSyncError) as info:
        next(receive(tensors.manifest(), timeout=0.2))
    assert str(info.value) == "no bucket arrived within 0.2 s"
    tensors.close()
    with SharedMemoryTransport(bucket_bytes=4) as shm:
        with pytest.raises(WeightSyncError) as info:
            next(receive(shm.manifest(), timeout=0.2))
        assert str(info.value) == ("shared-memory weight transfer: no bucket 1 arrived within "
                                   "0.2 s")


def test_disk_directory_without_an_index_is_read_in_file_order(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "w").mkdir()
    save_file({"b": torch.ones(1), "a": torch.zeros(1)}, str(tmp_path / "w" / "model.safetensors"))
    got = [(n, t.tolist()) for n, t in receive({"kind": "disk", "path": str(tmp_path / "w")})]
    assert got == [("a", [0.0]), ("b", [1.0])]


def test_in_process_sender_runs_at_most_two_buckets_ahead_and_waits_for_a_slow_receiver():
    """The queue holds a bucket and the end marker: while the consumer holds bucket 1, the
    sender has read at most 5 tensors (buckets 2 and 3 queued, bucket 4 waiting for tensor 5
    to close it). A receiver that pauses does not make the sender give up."""
    produced = 0

    def source() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal produced
        for name, t in four_byte_tensors(8):
            produced += 1
            yield name, t

    transport = TensorTransport(bucket_bytes=4, timeout=30)
    manifest = transport.manifest()
    sender = threading.Thread(target=transport.send, args=(source(),))
    sender.start()
    stream = receive(manifest, timeout=30)
    first = next(stream)
    threading.Event().wait(0.3)  # give the sender every chance to run ahead (it must not)
    ahead = produced
    rest = list(stream)
    sender.join()
    transport.close()
    assert ahead <= 5
    assert [n for n, _ in [first, *rest]] == [f"t{i}" for i in range(8)]


async def test_an_engine_error_with_a_plain_iterator_receiver_propagates():
    class Broken(_Reader):
        async def update_weights(self, update):
            next(iter(update.named_tensors))
            raise KeyError("no tensor 'x'")

    with pytest.raises(KeyError, match="no tensor 'x'"):
        await push_to_engine(Broken(), _Fake("custom"), four_byte_tensors(2))
