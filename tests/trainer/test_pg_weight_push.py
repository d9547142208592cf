"""Weight pushes over a process group (``transport: gloo``; ``nccl`` is the same code on
CUDA): the engine server joins a standalone group with the controller and receives each update
by broadcast while its HTTP call runs (``engines/weights_group.py``, ``service.py``)."""

from __future__ import annotations

import asyncio
import threading

import httpx2
import pytest
import torch

from areal_agents.engines.base import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.remote import RemoteEngine
from areal_agents.engines.server_process import free_port
from areal_agents.engines.service import build_app
from areal_agents.errors import EngineUnavailable, WeightSyncError
from areal_agents.gateway import Gateway
from areal_agents.models import tiny
from areal_agents.trainers.placement import InferencePlacement
from areal_agents.trainers.weight_nccl import NCCLTransport, join_group
from areal_agents.trainers.weight_push import WeightPush

from .test_trainer_push_stream import HeldBytes

BUCKET_MB = 1.0  # > the largest tensor of tiny:xs (the 512 KiB embedding)


class Export:
    """A train engine whose exported tensors are tracked copies of ``model``'s."""

    def __init__(self, model: torch.nn.Module, held: HeldBytes, fail_after: int | None = None):
        self.model, self.held, self.fail_after = model, held, fail_after

    def export_weights(self):
        for i, (name, t) in enumerate(self.model.state_dict().items()):
            if i == self.fail_after:
                raise RuntimeError("export failed")
            yield name, self.held.copy(t)


async def _replica(server: LocalEngine) -> RemoteEngine:
    transport = httpx2.ASGITransport(app=build_app(server, "t"))
    return await RemoteEngine.attach("http://engine", token="t", http_transport=transport,
                                     transport="gloo", timeout_s=60,
                                     bucket_bytes=int(BUCKET_MB * 2**20))


def _assert_weights(engine: LocalEngine, model: torch.nn.Module) -> None:
    served = engine.model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(served[name], t), name


async def test_gloo_push_reaches_the_server_and_bumps_the_version():
    torch.set_num_threads(1)
    source, tok = tiny("xs", seed=1)
    server = LocalEngine(tiny("xs", seed=0)[0], tok)
    gw = Gateway()
    gw.add_policy("p", [await _replica(server)], tok)
    push = WeightPush(InferencePlacement(kind="server", transport="gloo", bucket_mb=BUCKET_MB))
    try:
        held = HeldBytes()
        await gw.push_weights("p", await push.update(Export(source, held), version=1))
        assert server.version == 1
        _assert_weights(server, source)
        # the sender holds one exported tensor at a time (the largest) besides its one bucket
        assert held.peak == 2**19 <= push.bucket_bytes
        with torch.no_grad():  # a second push goes over the same group
            for p in source.parameters():
                p.mul_(0.5)
        await gw.push_weights("p", await push.update(Export(source, HeldBytes()), version=2))
        assert server.version == 2
        _assert_weights(server, source)
    finally:
        await gw.close()
        await server.close()


async def test_failed_export_leaves_the_server_and_the_next_push_works():
    torch.set_num_threads(1)
    source, tok = tiny("xs", seed=1)
    initial = tiny("xs", seed=0)[0]
    server = LocalEngine(tiny("xs", seed=0)[0], tok)
    gw = Gateway()
    gw.add_policy("p", [await _replica(server)], tok)
    push = WeightPush(InferencePlacement(kind="server", transport="gloo", bucket_mb=BUCKET_MB))
    try:
        broken = await push.update(Export(source, HeldBytes(), fail_after=7), version=1)
        with pytest.raises(RuntimeError, match=r"^export failed$"):
            await gw.push_weights("p", broken)
        assert server.version == 0
        _assert_weights(server, initial)  # nothing of the aborted update was loaded
        out = await server.generate(GenerateRequest([1, 2], SamplingParams(max_tokens=2)))
        assert len(out.outputs[0].token_ids) == 2  # resumed
        await gw.push_weights("p", await push.update(Export(source, HeldBytes()), version=1))
        assert server.version == 1
        _assert_weights(server, source)
    finally:
        await gw.close()
        await server.close()


def test_a_broadcast_nobody_receives_times_out_and_breaks_the_group():
    port, groups = free_port(), {}

    def join(rank: int) -> None:
        groups[rank] = join_group("127.0.0.1", port, rank, 2, timeout_s=2.0)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sender = NCCLTransport(groups[0], src=0, bucket_bytes=64)
    with pytest.raises(WeightSyncError, match=r"^a broadcast of the weight-update group failed"):
        sender.send([("w", torch.ones(4))])
    assert sender.broken
    with pytest.raises(WeightSyncError) as info:
        sender.send([("w", torch.ones(4))])
    assert str(info.value) == "the weight-update group failed earlier; join a new one"


def test_joining_alone_times_out_with_a_clear_error():
    port = free_port()
    with pytest.raises(WeightSyncError) as info:
        join_group("127.0.0.1", port, 0, 2, timeout_s=1.0)
    assert str(info.value).startswith(f"could not join the weight-update group at 127.0.0.1:"
                                      f"{port} as rank 0 of 2 (gloo) within 1 s: ")


@pytest.mark.slow
async def test_a_server_killed_mid_broadcast_fails_the_update_quickly(tmp_path):
    torch.set_num_threads(1)
    model, tok = tiny("xs", seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    engine = await RemoteEngine.launch(tmp_path / "m", transport="gloo", bucket_bytes=2**16,
                                       timeout_s=120, log_path=tmp_path / "server.log")

    def export():
        for i, (name, t) in enumerate(model.state_dict().items()):
            if i == 3:
                engine.server.stop()  # the server dies after some buckets went out
            yield name, t.clone()

    try:
        with pytest.raises(EngineUnavailable):
            await engine.update_weights(WeightUpdate(named_tensors=_Reiterable(export),
                                                     version=1))
    finally:
        await engine.close()


class _Reiterable:
    def __init__(self, fn):
        self.fn = fn

    def __iter__(self):
        return iter(self.fn())


@pytest.mark.slow
def test_trainer_pushes_over_gloo_to_a_server_replica(tmp_path):
    """One listener server replica fed by ``transport: gloo``: after training it serves the
    trained weights (same greedy ids and log-probs as a LocalEngine on them) at the trained
    version, and the push held one exported tensor at a time."""
    from areal_agents.trainers.policy import Policy
    from areal_agents.trainers.trainer import Trainer

    server = {"kind": "server", "transport": "gloo", "bucket_mb": BUCKET_MB,
              "server_args": {"max_batch_size": 8}}
    sampling = {"temperature": 1.0, "max_tokens": 1}
    policies = {
        "speaker": Policy(model="tiny:xs", seed=0, lr=1e-3, api="completions", sampling=sampling),
        "listener": Policy(model="tiny:xs", seed=1, lr=1e-3, api="completions",
                           sampling=sampling, inference=server),
    }
    trainer = Trainer(env="Signaling-v0", env_kwargs={"num_items": 4, "vocab_size": 10},
                      policies=policies, policy_map={"speaker": "speaker", "listener": "listener"},
                      batch_size=8, group_size=4, max_staleness=1, run_dir=tmp_path,
                      progress=False, seed=0)
    held = HeldBytes()

    async def run():
        await trainer.setup()
        train = trainer.train_engines["listener"]
        export = train.export_weights
        train.export_weights = lambda: ((n, held.copy(t)) for n, t in export())
        try:
            await trainer.afit(2)
            replica = trainer.gateway.policies["listener"].router.engines[0]
            state = await RemoteEngine.attach(replica.url, token=replica.token)
            served_version = state.version
            await state.close()
            request = GenerateRequest([3, 5, 7], SamplingParams(max_tokens=6, temperature=0.0))
            served = (await replica.generate(request)).outputs[0]
            model, tok = tiny("xs", seed=1)
            model.load_state_dict(dict(export()), strict=False)
            local = LocalEngine(model, tok)
            expected = (await local.generate(request)).outputs[0]
            await local.close()
            return served_version, train.version, served, expected
        finally:
            await trainer.aclose()

    served_version, trained_version, served, expected = asyncio.run(run())
    assert trainer.step == 2
    assert served_version == trained_version >= 2
    assert served.token_ids == expected.token_ids
    torch.testing.assert_close(torch.tensor(served.logprobs), torch.tensor(expected.logprobs),
                               rtol=0, atol=1e-5)
    assert 0 < held.peak <= 2**19  # one exported tensor at a time, never a bucket's worth more


@pytest.mark.parametrize(("inference", "message"), [
    ({"kind": "server", "transport": "gloo", "bucket_mb": 8}, None),
    ({"transport": "gloo"}, "policies.a.inference: Value error, Policy.inference: "
                            "kind='in_process' cannot use transport='gloo'; choose one of "
                            "['tensors', 'disk'] (or omit it)"),
    ({"kind": "vllm", "transport": "nccl", "device": "cpu"},
     "policies.a.inference: Value error, Policy.inference: transport='nccl' needs "
     "device='cuda'; use one of ['disk'] on CPU"),
])
def test_yaml_selects_the_gloo_transport(inference, message):
    from areal_agents.config import parse_config
    from areal_agents.errors import ConfigError
    from areal_agents.trainers.policy import Policy

    run = {"env": "Signaling-v0", "policies": {"a": {"inference": inference}},
           "policy_map": {"speaker": "a"}}
    if message is not None:
        with pytest.raises(ConfigError) as info:
            parse_config(run)
        assert str(info.value) == f"invalid config:\n  {message}"
        return
    policy = Policy(**parse_config(run).policies["a"].model_dump())
    push = WeightPush(policy.inference)
    assert (push.transport, push.bucket_bytes) == ("gloo", 8 * 2**20)
