"""Colocation (``trainers/colocate.py``): the exact requests vLLM and SGLang servers receive
around a train step (mock transports replaying the recorded servers), the order in a
``Trainer`` step with in-process engines, the config, and a CUDA check of the memory freed."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import yaml
from engines.test_sglang import FakeSGLang
from engines.test_sglang import attached as sglang_attached
from engines.test_vllm_client import FakeVLLM
from engines.test_vllm_client import attached as vllm_attached

from areal_agents.config import parse_config
from areal_agents.engines import WeightUpdate
from areal_agents.errors import ConfigError, EngineError
from areal_agents.gateway import Gateway
from areal_agents.models import tiny
from areal_agents.trainers.colocate import Colocation, NoColocation, Offloadable, colocation_for
from areal_agents.trainers.placement import InferencePlacement

UPDATE = [("model.norm.weight", torch.ones(4))]


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny("xs", seed=0)[1]


def _vllm_fake(**overrides: Any) -> FakeVLLM:
    return FakeVLLM(**{"POST /sleep": {"status": "sleeping", "level": 1},
                       "POST /wake_up": {"status": "awake"}, **overrides})


async def test_vllm_offloads_after_pausing_and_takes_weights_back_before_the_kv_cache(tok):
    fake = _vllm_fake()
    engine = await vllm_attached(fake)
    gw = Gateway()
    gw.add_policy("p", [engine], tok)
    start = len(fake.calls)
    colocation = Colocation(level=2)
    await colocation.before_train(gw, "p")
    assert [(m, p, q) for m, p, q, _ in fake.calls[start:]] == [
        ("POST", "/pause", {"mode": "keep"}), ("POST", "/sleep", {"level": "2", "mode": "keep"})]
    start = len(fake.calls)
    await colocation.push(gw, "p", WeightUpdate(named_tensors=UPDATE, version=1))
    assert [(m, p, q) for m, p, q, _ in fake.calls[start:]] == [
        ("POST", "/wake_up", {"tags": "weights"}),
        ("POST", "/collective_rpc", {}),  # the update, not paused again: already paused
        ("POST", "/reset_prefix_cache", {"reset_running_requests": "true"}),
        ("POST", "/update_weight_version", {}),
        ("POST", "/wake_up", {"tags": "kv_cache"}),
        ("POST", "/resume", {})]
    assert torch.equal(fake.saved_weights["model.norm.weight"], torch.ones(4))
    assert engine.version == 1 and isinstance(engine, Offloadable)
    await gw.close()


async def test_vllm_train_step_failure_brings_all_memory_back_then_resumes(tok):
    fake = _vllm_fake()
    engine = await vllm_attached(fake)
    gw = Gateway()
    gw.add_policy("p", [engine], tok)
    colocation = Colocation()
    await colocation.before_train(gw, "p")
    start = len(fake.calls)
    await colocation.after_failed_train(gw, "p")
    assert [(m, p, q) for m, p, q, _ in fake.calls[start:]] == [
        ("POST", "/wake_up", {}), ("POST", "/resume", {})]
    await gw.close()


async def test_vllm_without_sleep_mode_names_the_flag_and_a_failed_update_still_resumes(tok):
    import httpx2

    refused = httpx2.Response(500, json={"error": {"message": "Sleep mode is not enabled"}})
    fake = _vllm_fake(**{"POST /sleep": refused})
    engine = await vllm_attached(fake)
    gw = Gateway()
    gw.add_policy("p", [engine], tok)
    with pytest.raises(EngineError, match=r"colocation needs a vLLM server launched with "
                       r"--enable-sleep-mode \(server_args: \[--enable-sleep-mode\]\)"):
        await Colocation().before_train(gw, "p")
    fake.responses["POST /collective_rpc"] = httpx2.Response(400, json={"error": "bad name"})
    with pytest.raises(EngineError):
        await Colocation().push(gw, "p", WeightUpdate(named_tensors=UPDATE, version=1))
    assert fake.paths()[-1] == "POST /resume"  # no replica is left paused
    await gw.close()


async def test_sglang_releases_after_retracting_and_resumes_weights_then_kv_cache(tok):
    fake = FakeSGLang(**{"POST /release_memory_occupation": {"success": True},
                         "POST /resume_memory_occupation": {"success": True}})
    engine = await sglang_attached(fake)
    gw = Gateway()
    gw.add_policy("p", [engine], tok)
    start = len(fake.calls)
    colocation = Colocation()
    await colocation.before_train(gw, "p")
    await colocation.push(gw, "p", WeightUpdate(named_tensors=UPDATE, version=1))
    calls = [(m, p, b) for m, p, b in fake.calls[start:]]
    assert [(m, p) for m, p, _ in calls] == [
        ("POST", "/pause_generation"), ("POST", "/release_memory_occupation"),
        ("POST", "/resume_memory_occupation"), ("POST", "/update_weights_from_disk"),
        ("POST", "/resume_memory_occupation"), ("POST", "/continue_generation")]
    assert [b for _, p, b in calls if "memory" in p] == [{}, {"tags": ["weights"]},
                                                         {"tags": ["kv_cache"]}]
    assert calls[0][2] == {"mode": "retract"} and engine.version == 1
    await gw.close()


def test_colocation_is_a_placement_option_in_python_and_yaml():
    assert isinstance(colocation_for(InferencePlacement()), NoColocation)
    assert repr(colocation_for(InferencePlacement(kind="vllm", colocate=True,
                                                  offload_level=2))) == "Colocation(level=2)"
    config = parse_config(yaml.safe_load("""
        env: Signaling-v0
        policies:
          speaker: {inference: {kind: vllm, colocate: true, offload_level: 2}}
          listener: {}
        policy_map: {speaker: speaker, listener: listener}
    """))
    inference = config.policies["speaker"].inference
    assert (inference.colocate, inference.offload_level) == (True, 2)
    assert config.policies["listener"].inference.colocate is False
    with pytest.raises(ConfigError, match=r"Policy.inference.offload_level must be 1 \(weights "
                       r"kept in CPU memory\) or 2 \(dropped\), got 3"):
        InferencePlacement(colocate=True, offload_level=3)


async def test_a_colocated_trainer_step_pauses_its_replicas_for_the_train_step():
    """In-process engines (not ``Offloadable``: CPU memory) only pause: no generation runs
    while the policy trains, and the new weights are loaded before they resume."""
    from areal_agents.agents import ScriptedAgent
    from areal_agents.trainers.policy import Policy
    from areal_agents.trainers.trainer import Trainer

    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(lr=1e-2, sampling={"temperature": 1.0, "max_tokens": 1},
                                    inference={"colocate": True})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(lambda obs: "A")},
        batch_size=4, group_size=2, progress=False)
    await trainer.setup()
    events: list[str] = []
    gateway, engine = trainer.gateway, trainer.train_engines["speaker"]
    replica = gateway.policies["speaker"].router.engines[0]

    def traced(name: str, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            events.append(name)
            return method(*args, **kwargs)
        return call

    for name in ("pause", "resume", "update_weights", "push_weights"):
        setattr(gateway, name, traced(name, getattr(gateway, name)))
    train_step = engine.train_step

    def checked_train_step(*args: Any, **kwargs: Any) -> Any:
        events.append(f"train_step paused={replica._paused}")
        return train_step(*args, **kwargs)

    engine.train_step = checked_train_step
    try:
        await trainer.afit(2)
    finally:
        await trainer.aclose()
    assert events == ["pause", "train_step paused=True", "update_weights", "resume"] * 2
    assert replica.version == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not os.environ.get("AREAL_AGENTS_VLLM_PYTHON"),
                    reason="needs a CUDA device and a CUDA vLLM ($AREAL_AGENTS_VLLM_PYTHON)")
async def test_vllm_sleep_gives_the_gpu_memory_back_and_wakes_with_the_same_outputs(tmp_path):
    from areal_agents.engines import GenerateRequest, SamplingParams
    from areal_agents.engines.vllm import VLLMEngine

    model, tokenizer = tiny("xs", seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = await VLLMEngine.launch(tmp_path, enforce_eager=True,
                                     server_args=["--enable-sleep-mode",
                                                  "--gpu-memory-utilization", "0.2"])
    request = GenerateRequest([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
    try:
        before = (await engine.generate(request)).outputs[0].token_ids
        used = torch.cuda.mem_get_info()
        await engine.pause()
        await engine.offload(1)
        freed = torch.cuda.mem_get_info()
        assert freed[0] > used[0]  # free device memory grew
        await engine.onload(["weights"])
        await engine.onload(["kv_cache"])
        await engine.resume()
        assert (await engine.generate(request)).outputs[0].token_ids == before
    finally:
        await engine.close()
