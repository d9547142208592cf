"""The engine server's side of a streamed weight update: it spools what it receives to disk
and loads it one tensor at a time, so it holds about two buckets, not the whole update (it
used to collect the whole stream in a list before loading it)."""

from __future__ import annotations

import httpx2
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
