"""``Trainer.setup`` of worker-group policies served by engine servers: the controller never
materialises a model's parameters (a meta-device skeleton gives config and tokenizer), the
ranks load the model themselves (``ModelSource``) and rank 0 writes the serving directory.

The worker group and the servers are in-process fakes (no processes: fast tier); a spy on
``Qwen3ForCausalLM.__init__`` sees every model the controller builds."""

from __future__ import annotations

import asyncio

import httpx2
import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from areal_agents.engines.local import LocalEngine
from areal_agents.engines.remote import RemoteEngine
from areal_agents.engines.service import build_app
from areal_agents.models import eos_token_ids, load, save_tiny, tiny
from areal_agents.trainers import trainer_setup
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer
from areal_agents.trainers.trainer_setup import load_skeleton
from areal_agents.trainers.weight_transport import DiskTransport
from areal_agents.trainers.worker_group import ModelSource

_ELSEWHERE = [False]  # True while a fake rank or server builds its model (not the controller)


class FakeGroup:
    """A ``WorkerGroupEngine`` whose one "rank" loads the ``ModelSource`` it is given."""

    def __init__(self, model, placement, **kwargs):
        assert isinstance(model, ModelSource), type(model)
        _ELSEWHERE[0] = True
        try:
            self.model = model.load()
        finally:
            _ELSEWHERE[0] = False
        self.reference, self.warm_start_losses, self.step, self.version = None, [], 0, 0

    def export_weights(self):
        yield from self.model.state_dict().items()

    def write_weights(self, path, bucket_bytes):
        return DiskTransport(path, bucket_bytes).send(self.export_weights())

    def close(self):
        pass


@pytest.fixture
def controller_models(monkeypatch):
    """The parameter devices of every Qwen3 model built in the controller."""
    made: list[set[str]] = []
    init = Qwen3ForCausalLM.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not _ELSEWHERE[0]:
            made.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(Qwen3ForCausalLM, "__init__", spy)
    return made


@pytest.fixture
def fake_servers(monkeypatch):
    """``RemoteEngine.launch`` -> a ``LocalEngine`` on the serving dir, over ASGI."""
    servers: list[LocalEngine] = []

    async def launch(cls, model_dir, *, transport="shm", bucket_bytes=None, **kwargs):
        _ELSEWHERE[0] = True
        try:
            server = LocalEngine(*load(model_dir))
        finally:
            _ELSEWHERE[0] = False
        servers.append(server)
        return await RemoteEngine.attach(
            "http://engine", token="t", transport=transport, bucket_bytes=bucket_bytes,
            http_transport=httpx2.ASGITransport(app=build_app(server, "t")))

    monkeypatch.setattr(RemoteEngine, "launch", classmethod(launch))
    monkeypatch.setattr(trainer_setup, "WorkerGroupEngine", FakeGroup)
    return servers


def test_a_worker_group_policy_served_by_servers_is_never_materialised_here(
        tmp_path, controller_models, fake_servers):
    torch.set_num_threads(1)
    layout = {"train": {"world_size": 2}, "inference": {"kind": "server", "bucket_mb": 0.25}}
    policies = {"speaker": Policy(model="tiny:xs", seed=0, lr=1e-3, **layout),
                "listener": Policy(model="tiny:xs", seed=1, lr=1e-3, **layout)}
    trainer = Trainer(env="Signaling-v0", env_kwargs={"num_items": 4, "vocab_size": 10},
                      policies=policies, policy_map={"speaker": "speaker", "listener": "listener"},
                      batch_size=8, group_size=4, run_dir=tmp_path, progress=False, seed=0)

    async def run():
        await trainer.setup()
        await trainer.aclose()

    asyncio.run(run())
    assert controller_models == [{"meta"}, {"meta"}]  # the two skeletons, nothing else
    expected_model, tok = tiny("xs", seed=1)
    served = fake_servers[0].model.state_dict()  # "listener": set up first (sorted)
    for name, value in expected_model.state_dict().items():
        assert torch.equal(served[name], value), name
    assert (tmp_path / "serving" / "listener" / "model.safetensors.index.json").exists()
    assert (tmp_path / "serving" / "listener" / "tokenizer.json").exists()
    assert eos_token_ids(expected_model, tok) <= trainer.gateway.policies["listener"].stop_ids


def test_load_skeleton_of_a_checkpoint_directory(tmp_path, controller_models):
    path = save_tiny(tmp_path / "ckpt", "xs", seed=2)
    controller_models.clear()  # save_tiny built one
    model, tokenizer = load_skeleton(Policy(model=str(path)))
    assert controller_models == [{"meta"}]
    reference, reference_tok = load(path)
    assert model.config.hidden_size == reference.config.hidden_size
    assert eos_token_ids(model, tokenizer) == eos_token_ids(reference, reference_tok)
    assert tokenizer.encode("hello") == reference_tok.encode("hello")
