"""One weight-update group for all replicas of a policy (``ReplicaGroup``): a ``gloo`` push to
N engine servers is one broadcast (it was N, one two-rank group per replica)."""

from __future__ import annotations

import httpx2
import torch

from areal_agents.engines.local import LocalEngine
from areal_agents.engines.remote import RemoteEngine
from areal_agents.engines.service import build_app
from areal_agents.engines.weights_group import ReplicaGroup
from areal_agents.gateway import Gateway
from areal_agents.models import tiny
from areal_agents.trainers import weight_nccl
from areal_agents.trainers.placement import InferencePlacement
from areal_agents.trainers.serving import build_engines
from areal_agents.trainers.weight_push import WeightPush

BUCKET_MB = 1.0


class Export:
    def __init__(self, model):
        self.model = model

    def export_weights(self):
        yield from self.model.state_dict().items()


async def _replica(server: LocalEngine) -> RemoteEngine:
    return await RemoteEngine.attach(
        "http://engine", token="t", transport="gloo", timeout_s=60,
        http_transport=httpx2.ASGITransport(app=build_app(server, "t")),
        bucket_bytes=int(BUCKET_MB * 2**20))


def _assert_weights(engine: LocalEngine, model: torch.nn.Module) -> None:
    served = engine.model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(served[name], t), name


async def test_two_replicas_receive_one_broadcast_per_push(monkeypatch):
    torch.set_num_threads(1)
    sends = []
    send = weight_nccl.NCCLTransport.send

    def counted(self, named_tensors):
        sends.append(self.group.size())
        return send(self, named_tensors)

    monkeypatch.setattr(weight_nccl.NCCLTransport, "send", counted)
    source, tok = tiny("xs", seed=1)
    servers = [LocalEngine(tiny("xs", seed=0)[0], tok) for _ in range(2)]
    replicas = [await _replica(server) for server in servers]
    group = ReplicaGroup("gloo", int(BUCKET_MB * 2**20), timeout_s=60)
    for replica in replicas:
        replica.join_replica_group(group)
    gw = Gateway()
    gw.add_policy("p", replicas, tok)
    push = WeightPush(InferencePlacement(kind="server", transport="gloo", bucket_mb=BUCKET_MB))
    try:
        for version in (1, 2):
            with torch.no_grad():
                for p in source.parameters():
                    p.mul_(0.5)
            await gw.push_weights("p", await push.update(Export(source), version=version))
            assert [s.version for s in servers] == [r.version for r in replicas] == [version] * 2
            for server in servers:
                _assert_weights(server, source)
        assert sends == [3, 3]  # one broadcast per push, to a group of 1 + 2 ranks
        assert group.num_broadcasts == 2
    finally:
        await gw.close()
        for server in servers:
            await server.close()


async def test_build_engines_puts_a_policys_gloo_replicas_in_one_group(monkeypatch, tmp_path):
    async def launch(cls, model_dir, *, transport="shm", **kwargs):
        return RemoteEngine("http://127.0.0.1:9", token="t", max_context=64,
                            transport=transport)

    monkeypatch.setattr(RemoteEngine, "launch", classmethod(launch))
    model, tok = tiny("xs", seed=0)
    engines = await build_engines("p", InferencePlacement(kind="server", replicas=3,
                                                          transport="gloo"), model, tok, tmp_path)
    try:
        groups = {id(e.replica_group) for e in engines}
        assert len(groups) == 1 and engines[0].replica_group is not None
    finally:
        for engine in engines:
            await engine.close()
