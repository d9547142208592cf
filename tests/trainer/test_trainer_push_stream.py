"""The Trainer's weight push streams in bounded buckets: at most two buckets of exported tensors
are alive at once (through the Trainer, the disk and shm transports, the gateway's fan-out),
and a late replica gets the current weights and version before it takes traffic."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

import pytest
import torch

from areal_agents.agents import ScriptedAgent
from areal_agents.engines.base import WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.errors import ConfigError
from areal_agents.gateway import Gateway
from areal_agents.models import tiny, tiny_tokenizer
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.backends import BACKENDS, backend_factory, register_backend
from areal_agents.trainers.placement import InferencePlacement
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer
from areal_agents.trainers.weight_push import ExportedWeights, WeightPush
from areal_agents.trainers.weight_shm import SharedMemoryTransport
from areal_agents.trainers.weight_transport import DiskTransport, receive


class _Buffer(bytearray):
    """A tensor's memory; weak-referenceable, alive while any tensor or view uses it."""


class HeldBytes:
    """Exported tensors whose memory is tracked: the bytes still alive, and their peak."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.alive = self.peak = self.count = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A fresh copy of ``t`` whose memory this probe tracks until every view is gone."""
        n = t.numel() * t.element_size()
        buf = _Buffer(n)
        out = torch.frombuffer(buf, dtype=t.dtype).view(t.shape)
        out.copy_(t)
        with self.lock:
            self.alive += n
            self.peak = max(self.peak, self.alive)
            self.count += 1
        weakref.finalize(buf, self._free, n)
        return out

    def _free(self, n: int) -> None:
        with self.lock:
            self.alive -= n

    def source(self, sizes: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
        """Lazily exported float32 tensors of ``sizes`` bytes, named t0, t1, ..."""
        for i, n in enumerate(sizes):
            yield f"t{i}", self.copy(torch.full((n // 4,), float(i)))


# ---- transports ---------------------------------------------------------------------------------

def test_disk_writer_holds_at_most_two_buckets(tmp_path):
    # fails on the old writer (a written bucket stayed referenced while the next filled):
    # t0 + t1 (the first bucket, written) + t2 + t3 = 212 bytes were alive when t3 came
    held = HeldBytes()
    DiskTransport(tmp_path / "w", bucket_bytes=100).send(held.source([52, 48, 40, 72, 20]))
    got = list(receive(DiskTransport(tmp_path / "w").manifest()))
    assert [n for n, _ in got] == ["t0", "t1", "t2", "t3", "t4"]
    assert [t[0].item() for _, t in got] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert held.alive == 0
    assert held.peak <= 2 * 100
    assert held.peak == 52 + 48 + 40  # a full bucket and the tensor that closes it


@pytest.mark.parametrize("borrow", [False, True])
def test_shm_sender_holds_one_tensor_and_splits_larger_ones(borrow):
    # fails on the old sender: it gathered a bucket's tensors before writing them (peak 112)
    # and refused the 300-byte tensor (ValueError)
    held = HeldBytes()
    sizes = [52, 48, 300, 12, 64]
    with SharedMemoryTransport(bucket_bytes=128, timeout=30) as shm:
        manifest = shm.manifest()
        sender = threading.Thread(target=shm.send, args=(held.source(sizes),))
        sender.start()
        got = [(n, t.clone()) for n, t in receive(manifest, timeout=30, borrow=borrow)]
        sender.join()
    assert [(n, t.numel() * 4) for n, t in got] == [(f"t{i}", n) for i, n in enumerate(sizes)]
    for i, (_, t) in enumerate(got):
        assert torch.equal(t, torch.full_like(t, float(i)))
    assert held.peak == 300  # one exported tensor at a time: the block holds the rest


# ---- the gateway's fan-out --------------------------------------------------------------------

class Recorder(ScriptedEngine):
    """A replica that records the names it loaded and drops each tensor as it reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[str] = []

    async def update_weights(self, update: WeightUpdate) -> None:
        assert update.named_tensors is not None
        self.loaded = []
        for name, t in update.named_tensors:
            self.loaded.append(name)
            del t  # not held while the next one is exported
        self.version = update.version


async def test_gateway_iterates_an_export_once_per_replica_without_materialising_it():
    # fails on the old Gateway.update_weights: list(update.named_tensors) held every tensor
    held = HeldBytes()
    calls = []

    def export():
        calls.append(1)
        return held.source([64] * 6)

    engines = [Recorder(), Recorder()]
    gw = Gateway()
    gw.add_policy("p", engines, tiny_tokenizer())
    await gw.push_weights("p", WeightUpdate(named_tensors=ExportedWeights(export), version=1))
    assert len(calls) == 2
    assert [e.loaded for e in engines] == [[f"t{i}" for i in range(6)]] * 2
    assert [e.version for e in engines] == [1, 1]
    assert held.peak == 64


async def test_server_replicas_stream_an_export_through_their_shm_blocks():
    # fails on the old RemoteEngine: it listed the tensors first (all 2.6 MB alive) and sized
    # its block by the largest tensor, not the placement's bucket
    import httpx2

    from areal_agents.engines.remote import RemoteEngine
    from areal_agents.engines.service import build_app

    torch.set_num_threads(1)
    source, tok = tiny("xs", seed=1)
    held = HeldBytes()
    placement = InferencePlacement(kind="server", bucket_mb=0.125)  # 128 KiB < the embedding
    servers, replicas = [], []
    for _ in range(2):
        servers.append(LocalEngine(tiny("xs", seed=0)[0], tok))
        transport = httpx2.ASGITransport(app=build_app(servers[-1], "t"))
        replicas.append(await RemoteEngine.attach(
            "http://engine", token="t", http_transport=transport, transport="shm",
            bucket_bytes=placement.bucket_bytes))
    gw = Gateway()
    gw.add_policy("p", replicas, tok)
    try:
        class Engine:
            def export_weights(self):
                return ((n, held.copy(t)) for n, t in source.state_dict().items())

        update = await WeightPush(placement).update(Engine(), version=1)
        await gw.push_weights("p", update)
        assert [r.version for r in replicas] == [1, 1]
        assert [s.version for s in servers] == [1, 1]
        for server in servers:
            for name, t in source.state_dict().items():
                torch.testing.assert_close(server.model.state_dict()[name], t)
        assert held.peak == 2**19  # one exported tensor at a time: the largest
    finally:
        await gw.close()
        for server in servers:
            await server.close()


# ---- placement and WeightPush -----------------------------------------------------------------

def test_bucket_mb_is_validated_and_chooses_the_bucket():
    assert InferencePlacement(bucket_mb=0.5).bucket_bytes == 2**19
    assert InferencePlacement().bucket_bytes == 256 * 2**20
    for bad in (0, -1, True, "64"):
        with pytest.raises(ConfigError) as info:
            InferencePlacement(bucket_mb=bad)
        assert str(info.value) == ("Policy.inference.bucket_mb must be a number > 0 (MiB per "
                                   f"weight transfer), got {bad!r}")
    policy = Policy(inference={"transport": "disk", "bucket_mb": 64})
    assert (policy.inference.resolved_transport(), policy.inference.bucket_bytes) == (
        "disk", 64 * 2**20)


@pytest.mark.parametrize(("inference", "message"), [
    ({"kind": "server", "transport": "shm", "bucket_mb": 64}, None),
    ({"transport": "shm"}, "policies.a.inference: Value error, Policy.inference: "
                           "kind='in_process' cannot use transport='shm'; choose one of "
                           "['tensors', 'disk'] (or omit it)"),
    ({"bucket_mb": 0}, "policies.a.inference: Value error, Policy.inference.bucket_mb must be "
                       "a number > 0 (MiB per weight transfer), got 0"),
])
def test_yaml_selects_the_transport_and_bucket(inference, message):
    from areal_agents.config import parse_config

    run = {"env": "Signaling-v0", "policies": {"a": {"inference": inference}},
           "policy_map": {"speaker": "a"}}
    if message is not None:
        with pytest.raises(ConfigError) as info:
            parse_config(run)
        assert str(info.value) == f"invalid config:\n  {message}"
        return
    policy = Policy(**parse_config(run).policies["a"].model_dump())
    assert policy.inference == InferencePlacement(kind="server", transport="shm", bucket_mb=64)
    assert WeightPush(policy.inference).bucket_bytes == 64 * 2**20


def test_cuda_device_is_refused_where_cuda_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert InferencePlacement().resolved_device() == "cpu"
    with pytest.raises(ConfigError) as info:
        InferencePlacement(device="cuda").resolved_device()
    assert str(info.value) == ("Policy.inference: device='cuda' but CUDA is not available on "
                               "this host (torch.cuda.is_available() is False); use "
                               "device='cpu' or omit device")


async def test_server_replicas_refuse_cuda():
    from areal_agents.trainers.serving import build_engines

    with pytest.raises(ConfigError, match="kind='server' engines run on the CPU"):
        await build_engines("p", InferencePlacement(kind="server", device="cuda"), None, None,
                            None)


@pytest.mark.cuda
async def test_in_process_engine_runs_on_cuda():
    from areal_agents.trainers.serving import build_engines

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tok = tiny("xs", seed=0)
    (engine,) = await build_engines("p", InferencePlacement(device="cuda"), model, tok, None)
    assert next(engine.model.parameters()).device.type == "cuda"
    await engine.update_weights(WeightUpdate(named_tensors=model.state_dict().items(),
                                             version=1))
    assert engine.version == 1
    await engine.close()


# ---- through the Trainer ----------------------------------------------------------------------

@pytest.fixture
def probe_backend():
    """Backend "probe": FSDP in one process whose export yields tracked fresh copies."""
    held = HeldBytes()
    base = backend_factory("fsdp")

    class ProbeEngine(base):  # type: ignore[misc, valid-type]
        def export_weights(self, *args, **kwargs):
            for name, t in super().export_weights(*args, **kwargs):
                yield name, held.copy(t)

    register_backend("probe", ProbeEngine)
    yield held
    BACKENDS.pop("probe", None)


async def test_trainer_push_holds_at_most_two_buckets_and_a_late_replica_catches_up(
        tmp_path, probe_backend):
    # fails on the old Trainer: list(engine.export_weights()) held all 2.6 MB at once
    bucket = 2**19  # the largest tensor (the embedding) is exactly one bucket
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(backend="probe", lr=1e-3,
                                    sampling={"temperature": 1.0, "max_tokens": 1},
                                    inference={"transport": "disk", "bucket_mb": 0.5})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(lambda obs: "A")},
        batch_size=4, group_size=2, run_dir=tmp_path, progress=False)
    try:
        await trainer.afit(1)
        held = probe_backend
        engine = trainer.train_engines["speaker"]
        exported = sum(t.numel() * t.element_size() for _, t in engine.export_weights())
        assert exported > 4 * bucket  # the state is several buckets
        assert 0 < held.peak <= 2 * bucket
        served = trainer.gateway.policies["speaker"].router.engines[0]
        assert served.version == 1
        trained = {n: t.clone() for n, t in engine.export_weights()}  # untracked copies
        state = served.model.state_dict()
        for name, t in trained.items():
            torch.testing.assert_close(state[name], t)
        assert (tmp_path / "weights" / "speaker" / "model.safetensors.index.json").exists()

        assert held.alive == 0
        held.peak = 0
        model, tok = tiny("xs", seed=0)  # a late replica at version 0, initial weights
        late = LocalEngine(model, tok)
        index = await trainer.add_replica("speaker", late)
        assert index == 1
        assert late.version == 1
        for name, t in trained.items():
            torch.testing.assert_close(late.model.state_dict()[name], t)
        assert held.peak <= 2 * bucket
        with pytest.raises(KeyError, match="'listener' is not a trainable policy"):
            await trainer.add_replica("listener", late)
    finally:
        await trainer.aclose()


@pytest.mark.multiprocess
@pytest.mark.slow
async def test_a_worker_groups_rank_0_writes_the_disk_update_itself(tmp_path):
    # fails on the old code: WorkerGroupEngine had no write_weights, every tensor of a push
    # crossed the pipes to the controller
    from fsdp._helpers import make_model

    from areal_agents.trainers.placement import TrainPlacement
    from areal_agents.trainers.worker_group import WorkerGroupEngine

    torch.set_num_threads(1)
    engine = WorkerGroupEngine(make_model(), TrainPlacement(world_size=2), lr=1e-3)
    try:
        want = dict(engine.export_weights())

        def no_export():
            raise AssertionError("the push exported through the controller")

        engine.export_weights = no_export  # type: ignore[method-assign]
        push = WeightPush(InferencePlacement(transport="disk", bucket_mb=0.01),
                          tmp_path / "w")
        update = await push.update(engine, version=4)
        assert (update.path, update.version) == (str(tmp_path / "w"), 4)
        got = list(receive(DiskTransport(tmp_path / "w").manifest()))
        assert [n for n, _ in got] == list(want)
        for name, t in got:
            assert torch.equal(t, want[name])
        assert len(list((tmp_path / "w").glob("*.safetensors"))) > 2  # several shards
    finally:
        engine.close()
