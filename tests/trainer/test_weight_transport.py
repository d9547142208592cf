"""Weight transports (tensors, shm, disk): order, dtypes, bucket bounds, failures."""

from __future__ import annotations

import json
import os
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


def weights() -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and shapes, a 0-d tensor, and one tensor bigger than the others."""
    g = torch.Generator().manual_seed(0)
    out = [(f"model.layers.{i}.w", torch.randn(3, i + 1, generator=g).to(torch.bfloat16))
           for i in range(6)]
    out += [("model.norm.weight", torch.randn(5, generator=g)),
            ("step", torch.tensor(7, dtype=torch.int64)),
            ("lm_head.weight", torch.randn(8, 4, generator=g).half())]
    return out


def transports(tmp_path: os.PathLike[str], bucket_bytes: int) -> dict[str, object]:
    return {"tensors": TensorTransport(bucket_bytes, timeout=10),
            "shm": SharedMemoryTransport(bucket_bytes, timeout=10),
            "disk": DiskTransport(os.path.join(tmp_path, "w"), bucket_bytes)}


def run(transport, named, manifest=None) -> list[tuple[str, torch.Tensor]]:
    """Send in a thread, receive here (disk: send first)."""
    manifest = manifest or transport.manifest()
    if manifest["kind"] == "disk":
        transport.send(named)
        return list(receive(manifest))
    errors: list[BaseException] = []

    def send() -> None:
        try:
            transport.send(named)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        return list(receive(manifest, timeout=10))
    finally:
        sender.join()
        if errors:
            raise errors[0]


@pytest.mark.parametrize("kind", ["tensors", "shm", "disk"])
def test_round_trip_keeps_order_dtype_shape_values(tmp_path, kind):
    transport = transports(tmp_path, 64)[kind]
    sent = weights()
    try:
        got = run(transport, sent)
        got_again = run(transport, sent)  # the transport is reusable
    finally:
        transport.close()
    for received in (got, got_again):
        assert [n for n, _ in received] == [n for n, _ in sent]
        for (_, a), (_, b) in zip(sent, received, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_tensor_transport_is_zero_copy():
    transport = TensorTransport(bucket_bytes=1024)
    sent = weights()
    got = run(transport, sent)
    assert all(a.data_ptr() == b.data_ptr() for (_, a), (_, b) in zip(sent, got, strict=True))


@pytest.mark.parametrize("borrow", [False, True])
def test_shm_buckets_are_bounded_and_copied_one_at_a_time(borrow):
    # 6 tensors of 16 floats = 64 bytes each; a 128-byte block holds two per bucket
    sent = [(f"t{i}", torch.full((16,), float(i))) for i in range(6)]
    with SharedMemoryTransport(bucket_bytes=128, timeout=10) as shm:
        manifest = shm.manifest()
        header = torch.frombuffer(shm.block.buf, dtype=torch.int64, count=64)
        sender = threading.Thread(target=shm.send, args=(sent,))
        sender.start()
        published = []
        for name, t in receive(manifest, timeout=10, borrow=borrow):
            for _ in range(100):  # give the sender every chance to run ahead (it must not)
                threading.Event().wait(0.0001)
            published.append((name, int(header[1])))  # buckets published when it was yielded
            assert torch.equal(t, dict(sent)[name])  # (a borrowed view still holds it)
            del t
        sender.join()
        del header
    # tensor t_i is in bucket i // 2 + 1. Copies: the block may already hold the next bucket
    # (the current one was copied out), never the one after. Borrowed views: the sender waits
    # until the consumer has moved past the bucket's last view.
    buckets = [i // 2 + 1 for i in range(6)]
    assert [name for name, _ in published] == [f"t{i}" for i in range(6)]
    if borrow:
        assert [p for _, p in published] == buckets
    else:
        assert all(b <= p <= b + 1 for (_, p), b in zip(published, buckets, strict=True))


def failing_source(n: int) -> Iterator[tuple[str, torch.Tensor]]:
    for i in range(n):
        yield f"t{i}", torch.full((16,), float(i))
    raise RuntimeError("export failed")


@pytest.mark.parametrize("kind", ["tensors", "shm"])
def test_sender_failure_raises_on_both_sides(tmp_path, kind):
    transport = transports(tmp_path, 64)[kind]
    manifest = transport.manifest()
    received: list[str] = []
    errors: list[BaseException] = []

    def send() -> None:
        try:
            transport.send(failing_source(3))
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    with pytest.raises(WeightSyncError, match="the sender aborted the update"):
        for name, _ in receive(manifest, timeout=10):
            received.append(name)
    sender.join()
    transport.close()
    assert [type(e) for e in errors] == [RuntimeError]
    assert len(received) < 3 or kind == "tensors"  # shm: never the bucket in the making


@pytest.mark.parametrize("kind", ["tensors", "shm"])
def test_receiver_stopping_early_makes_the_sender_raise(tmp_path, kind):
    transport = transports(tmp_path, 64)[kind]
    manifest = transport.manifest()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            transport.send((f"t{i}", torch.zeros(16)) for i in range(8))
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    stream = receive(manifest, timeout=10)
    next(stream)
    stream.close()
    sender.join(timeout=20)
    transport.close()
    assert not sender.is_alive()
    assert [str(e) for e in errors] == [
        "the receiver stopped before the update was complete" if kind == "tensors"
        else "a receiver stopped before the update was complete"]


def test_disk_transport_is_atomic_sharded_and_indexed(tmp_path):
    path = tmp_path / "w"
    DiskTransport(path, bucket_bytes=64).send([(f"t{i}", torch.zeros(16)) for i in range(3)])
    files = sorted(os.listdir(path))
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 3 * 64
    assert index["weight_map"]["t2"] == "model-00003-of-00003.safetensors"
    # a crashed writer's partial directory is replaced; a failing source leaves path intact
    os.makedirs(str(path) + ".partial/junk")
    with pytest.raises(RuntimeError, match="export failed"):
        DiskTransport(path, bucket_bytes=64).send(failing_source(2))
    assert sorted(os.listdir(path)) == files
    assert not os.path.exists(str(path) + ".partial")


def test_receive_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown transport kind 'smoke'"):
        receive({"kind": "smoke"})
    with pytest.raises(WeightSyncError, match="no weight directory at"):
        receive({"kind": "disk", "path": str(tmp_path / "missing")})
    with pytest.raises(WeightSyncError, match="in-process tensors cannot cross processes"):
        receive({"kind": "tensors", "channel": "nope"})
    shm = SharedMemoryTransport(bucket_bytes=64)
    manifest = shm.manifest()
    shm.close()
    with pytest.raises(WeightSyncError, match="the sender closed it, or runs on another host"):
        receive(manifest)


@pytest.mark.parametrize("kind", ["tensors", "shm", "disk"])
async def test_push_to_engine_loads_and_sets_the_version(tmp_path, kind):
    seen: list[str] = []

    class Recording(ScriptedEngine):
        async def update_weights(self, update):
            if update.path is not None:
                update.named_tensors, update.path = receive({"kind": "disk",
                                                             "path": update.path}), None
            for name, _ in update.named_tensors:
                seen.append(name)
            self.version = update.version

    transport = transports(tmp_path, 64)[kind]
    engine = Recording()
    sent = await push_to_engine(engine, transport, weights(), version=3)
    transport.close()
    assert engine.version == 3
    assert sorted(seen) == sorted(n for n, _ in weights())
    assert sent == sum(t.numel() * t.element_size() for _, t in weights())


@pytest.mark.parametrize("kind", ["tensors", "shm"])
async def test_push_to_engine_engine_error_stops_the_sender(tmp_path, kind):
    class Broken(ScriptedEngine):
        async def update_weights(self, update):
            next(iter(update.named_tensors))
            raise KeyError("no tensor 'x'")

    transport = transports(tmp_path, 64)[kind]
    with pytest.raises(KeyError, match="no tensor 'x'"):
        await push_to_engine(Broken(), transport, weights(), version=1)
    transport.close()


def test_shm_cancel_stops_a_sender_whose_receiver_never_came():
    errors: list[BaseException] = []
    with SharedMemoryTransport(bucket_bytes=64, timeout=60) as shm:
        shm.manifest()

        def send() -> None:
            try:
                shm.send((f"t{i}", torch.zeros(16)) for i in range(4))
            except BaseException as exc:
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        shm.cancel()
        sender.join(timeout=20)
        assert not sender.is_alive()
    assert [str(e) for e in errors] == ["a receiver stopped before the update was complete"]


def test_shm_close_under_a_running_sender_stops_it_instead_of_unmapping_under_it():
    """close() while send runs in another thread (no receiver came): the sender raises
    WeightSyncError and close() unmaps only after it stopped (it used to unmap under the
    sender: SIGSEGV, the whole process gone)."""
    errors: list[BaseException] = []
    started = threading.Event()
    shm = SharedMemoryTransport(bucket_bytes=64, timeout=60)
    shm.manifest()

    def source() -> Iterator[tuple[str, torch.Tensor]]:
        for i in range(64):
            started.set()
            yield f"t{i}", torch.full((16,), float(i))

    def send() -> None:
        try:
            shm.send(source())
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    started.wait(20)
    shm.close()
    assert shm.block is None and not sender.is_alive()
    sender.join()
    assert [str(e) for e in errors] == ["a receiver stopped before the update was complete"]
    shm.close()  # idempotent
