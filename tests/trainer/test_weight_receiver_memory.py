"""The engine server's side of a streamed weight update: it spools what it receives to disk
and loads it one tensor at a time, so it holds about two buckets, not the whole update (it
used to collect the whole stream in a list before loading it)."""

from __future__ import annotations

import httpx2
import pytest
import torch

from areal_agents.engines.base import WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.remote import RemoteEngine
from areal_agents.engines.service import build_app
from areal_agents.models import tiny
from areal_agents.trainers import weight_transport

from .test_trainer_push_stream import HeldBytes

BUCKET = 2**19  # the largest tensor of tiny:xs (the embedding); the model is ~4 of them


async def test_a_shm_update_is_received_in_two_buckets_and_loaded_whole(monkeypatch):
    torch.set_num_threads(1)
    held = HeldBytes()
    receive = weight_transport.receive

    def tracked(manifest, **kwargs):  # what the server receives, as tracked copies
        return ((name, held.copy(t)) for name, t in receive(manifest, **kwargs))

    monkeypatch.setattr(weight_transport, "receive", tracked)
    source, tok = tiny("xs", seed=1)
    server = LocalEngine(tiny("xs", seed=0)[0], tok)
    engine = await RemoteEngine.attach(
        "http://engine", token="t", transport="shm", bucket_bytes=BUCKET,
        http_transport=httpx2.ASGITransport(app=build_app(server, "t")))
    try:
        state = source.state_dict()
        await engine.update_weights(WeightUpdate(named_tensors=list(state.items()), version=1))
        assert server.version == engine.version == 1
        served = server.model.state_dict()
        for name, value in state.items():
            assert torch.equal(served[name], value), name
        total = sum(t.numel() * t.element_size() for t in state.values())
        assert held.count == len(state) and total > 3 * BUCKET
        assert held.peak <= 2 * BUCKET  # was the whole update (total)
        assert held.alive == 0
    finally:
        await engine.close()
        await server.close()


async def test_an_update_within_one_bucket_is_loaded_from_memory_without_the_disk(monkeypatch):
    # fails on the old code: every streamed update was spooled to disk and read back
    from areal_agents.trainers import weight_sync

    def no_disk(*args, **kwargs):
        raise AssertionError("a one-bucket update must not be spooled to disk")

    monkeypatch.setattr(weight_sync, "save_safetensors_dir", no_disk)
    torch.set_num_threads(1)
    source, tok = tiny("xs", seed=1)
    server = LocalEngine(tiny("xs", seed=0)[0], tok)
    engine = await RemoteEngine.attach(
        "http://engine", token="t", transport="shm", bucket_bytes=2**24,  # the whole model
        http_transport=httpx2.ASGITransport(app=build_app(server, "t")))
    try:
        state = source.state_dict()
        await engine.update_weights(WeightUpdate(named_tensors=list(state.items()), version=3))
        assert server.version == engine.version == 3
        served = server.model.state_dict()
        assert all(torch.equal(served[name], value) for name, value in state.items())
    finally:
        await engine.close()
        await server.close()


def test_receive_update_holds_one_bucket_then_spools_everything_in_order(tmp_path):
    from areal_agents.engines.service import receive_update
    from areal_agents.trainers.weight_sync import load_safetensors_dir

    named = [(f"w{i}", torch.full((4,), float(i))) for i in range(5)]  # 16 bytes each
    held = receive_update(iter(named), bucket_bytes=80, spool=str(tmp_path / "a"))
    assert held is not None and [n for n, _ in held] == [n for n, _ in named]
    assert not (tmp_path / "a").exists()
    assert receive_update(iter(named), bucket_bytes=79, spool=str(tmp_path / "b")) is None
    spooled = dict(load_safetensors_dir(str(tmp_path / "b")))
    assert sorted(spooled) == [n for n, _ in named]
    assert all(torch.equal(spooled[n], t) for n, t in named)


def test_receive_update_raises_what_the_stream_raises():
    from areal_agents.engines.service import receive_update

    def broken():
        yield "w", torch.ones(2)
        raise RuntimeError("the sender aborted")

    with pytest.raises(RuntimeError, match=r"^the sender aborted$"):
        receive_update(broken(), bucket_bytes=1 << 20, spool="/nonexistent/never-written")
