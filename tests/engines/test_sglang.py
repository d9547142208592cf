"""``SGLangEngine`` against a fake SGLang server (``httpx2.MockTransport``).

SGLang has no CPU wheel, so nothing here was recorded from a live server: ``FakeSGLang``
answers in the shapes of sgl-project/sglang's own code -- ``python/sglang/srt/entrypoints/
http_server.py`` (routes, status codes, ``{"error": {"message"}}`` bodies),
``python/sglang/srt/managers/io_struct.py`` (request fields) and the ``meta_info`` that
``tokenizer_manager.py`` builds (``output_token_logprobs`` triples, ``finish_reason`` dicts,
``weight_version``). ``test_sglang_live.py`` checks the same engine on a real server (GPU).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
from pathlib import Path
from typing import Any

import httpx2
import pytest
import torch
from safetensors.torch import load_file

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.sampling import processed_logprobs
from areal_agents.engines.server_process import ServerProcess
from areal_agents.engines.sglang import SGLangEngine
from areal_agents.errors import (
    ConfigError,
    ContextLengthExceeded,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
)

URL = "http://sglang.test"
MODEL_INFO = {"model_path": "/models/tiny", "tokenizer_path": "/models/tiny",
              "is_generation": True, "preferred_sampling_params": None,
              "weight_version": "3"}
MODELS = {"object": "list", "data": [{"id": "/models/tiny", "object": "model", "created": 0,
                                      "owned_by": "sglang", "root": "/models/tiny",
                                      "max_model_len": 1024}]}


def completion(ids: list[int], logprobs: list[float], finish: dict[str, Any], *,
               label: str = "3", rid: str = "r1", prompt_tokens: int = 5,
               top: list[list[tuple[int, float]]] | None = None) -> dict[str, Any]:
    """One ``/generate`` answer as SGLang builds it (return_logprob, no text in log-probs)."""
    meta: dict[str, Any] = {
        "id": rid, "finish_reason": finish, "prompt_tokens": prompt_tokens,
        "weight_version": label, "num_retractions": 0,
        "input_token_logprobs": [[None, 1, None]],
        "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, ids, strict=True)],
        "completion_tokens": len(ids), "cached_tokens": 0, "e2e_latency": 0.05}
    if top is not None:
        meta["input_top_logprobs"] = [None]
        meta["output_top_logprobs"] = [[[lp, t, None] for t, lp in row] for row in top]
    return {"text": "", "output_ids": list(ids), "meta_info": meta}


GENERATED = completion([11, 12, 2], [-0.5, -1.25, -0.125], {"type": "stop", "matched": 2})


class FakeSGLang:
    """A ``MockTransport`` handler answering like SGLang; ``calls`` logs ``(method, path,
    json_body)``; ``responses`` maps ``"METHOD /path"`` to a body, an ``httpx2.Response``, an
    exception to raise, or a callable of the JSON body."""

    def __init__(self, **overrides: Any) -> None:
        self.label = MODEL_INFO["weight_version"]
        self.responses: dict[str, Any] = {
            "GET /get_model_info": lambda _: {**MODEL_INFO, "weight_version": self.label},
            "GET /v1/models": MODELS,
            "POST /generate": GENERATED,
            "POST /pause_generation": {"message": "Generation paused successfully.",
                                       "status": "ok"},
            "POST /continue_generation": {"message": "Generation continued successfully.",
                                          "status": "ok"},
            "POST /abort_request": httpx2.Response(200),
            "POST /update_weight_version": self._relabel,
            "POST /update_weights_from_disk": self._from_disk,
            "POST /update_weights_from_tensor": self._updated,
            "POST /init_weights_update_group": {"success": True,
                                                "message": "Succeeded to initialize group."},
            "POST /update_weights_from_distributed": self._updated,
        }
        self.responses.update(overrides)
        self.calls: list[tuple[str, str, Any]] = []
        self.loaded: dict[str, torch.Tensor] = {}

    def _relabel(self, body: dict[str, Any]) -> dict[str, Any]:
        self.label = body["new_version"]
        return {"success": True, "message": f"Weight version updated to {self.label}",
                "new_version": self.label}

    def _updated(self, body: dict[str, Any]) -> dict[str, Any]:
        self.label = body.get("weight_version") or self.label
        return {"success": True, "message": "Succeeded to update model weights."}

    def _from_disk(self, body: dict[str, Any]) -> dict[str, Any]:
        for file in sorted(Path(body["model_path"]).glob("*.safetensors")):  # read them now:
            self.loaded.update(load_file(str(file)))  # the engine deletes its own afterwards
        return {**self._updated(body), "num_paused_requests": 0}

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.path, body))
        answer = self.responses.get(f"{request.method} {request.url.path}")
        if callable(answer) and not isinstance(answer, httpx2.Response):
            answer = answer(body)
            if asyncio.iscoroutine(answer):
                answer = await answer
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx2.Response):
            return answer
        if answer is None:
            return httpx2.Response(404, json={"detail": "Not Found"})
        return httpx2.Response(200, json=answer)

    def paths(self, start: int = 0) -> list[str]:
        return [f"{m} {p}" for m, p, _ in self.calls[start:]]


async def attached(fake: FakeSGLang, **kwargs: Any) -> SGLangEngine:
    return await SGLangEngine.attach(URL, transport=httpx2.MockTransport(fake), **kwargs)


def req(prompt: list[int] | None = None, rid: str = "r1", **sampling: Any) -> GenerateRequest:
    return GenerateRequest(prompt or [1, 20, 30, 40, 50], SamplingParams(**sampling),
                           request_id=rid)


# -- attach -------------------------------------------------------------------------------------


async def test_attach_reads_context_and_keeps_an_integer_label():
    fake = FakeSGLang()
    engine = await attached(fake)
    assert (engine.max_context, engine.version) == (1024, 3)
    assert fake.paths() == ["GET /get_model_info", "GET /v1/models"]
    await engine.close()


async def test_attach_labels_a_fresh_server_with_version_zero_without_aborting():
    fake = FakeSGLang()
    fake.label = "default"  # SGLang's label before any update
    engine = await attached(fake, max_context=512)
    assert (engine.version, engine.max_context, fake.label) == (0, 512, "0")
    assert fake.calls[-1] == ("POST", "/update_weight_version",
                              {"new_version": "0", "abort_all_requests": False})
    await engine.close()


async def test_attach_refuses_embedding_models_and_servers_without_a_context_length():
    embedding = FakeSGLang(**{"GET /get_model_info": {**MODEL_INFO, "is_generation": False}})
    with pytest.raises(EngineError, match="serves '/models/tiny', which is not a generation"):
        await attached(embedding)
    bare = FakeSGLang(**{"GET /v1/models": {"object": "list", "data": [{"id": "m"}]}})
    with pytest.raises(EngineError, match=r"no max_model_len in /v1/models; pass "
                       r"SGLangEngine.attach\(max_context=\.\.\.\)"):
        await attached(bare)


# -- generate -----------------------------------------------------------------------------------


async def test_generate_sends_input_ids_and_parses_ids_logprobs_finish_and_versions():
    fake = FakeSGLang()
    engine = await attached(fake)
    result = await engine.generate(req(max_tokens=8, temperature=0.7, stop_token_ids=[2],
                                       stop=["\n"]))
    assert fake.calls[-1] == ("POST", "/generate", {
        "input_ids": [1, 20, 30, 40, 50], "rid": "r1", "return_logprob": True,
        "logprob_start_len": -1, "top_logprobs_num": 0, "stream": False,
        "sampling_params": {"n": 1, "max_new_tokens": 8, "temperature": 0.7, "top_p": 1.0,
                            "top_k": -1, "stop": ["\n"], "stop_token_ids": [2]}})
    out = result.outputs[0]
    assert (out.token_ids, out.logprobs) == ([11, 12, 2], [-0.5, -1.25, -0.125])
    assert out.finish_reason == "stop" and out.versions == [3, 3, 3]
    assert result.prompt_ids == [1, 20, 30, 40, 50] and engine.num_pending == 0
    await engine.close()


async def test_n_completions_come_back_as_a_list_in_order():
    answers = [completion([5, 6], [-0.1, -0.2], {"type": "length", "length": 2}, rid="r1_0"),
               completion([7, 2], [-0.3, -0.4], {"type": "stop", "matched": 2}, rid="r1_1")]
    fake = FakeSGLang(**{"POST /generate": answers})
    engine = await attached(fake)
    result = await engine.generate(req(max_tokens=2, n=2, seed=7))
    assert fake.calls[-1][2]["sampling_params"]["n"] == 2
    assert fake.calls[-1][2]["sampling_params"]["sampling_seed"] == 7
    assert [o.token_ids for o in result.outputs] == [[5, 6], [7, 2]]
    assert [o.finish_reason for o in result.outputs] == ["length", "stop"]
    fake.responses["POST /generate"] = answers[:1]
    with pytest.raises(EngineError, match="1 completion\\(s\\) for n=2"):
        await engine.generate(req(max_tokens=2, n=2))
    await engine.close()


async def test_greedy_requests_switch_off_top_k_and_top_p():
    fake = FakeSGLang()
    engine = await attached(fake)
    await engine.generate(req(max_tokens=3, temperature=0, top_k=3, top_p=0.5, top_logprobs=0))
    sent = fake.calls[-1][2]
    assert (sent["sampling_params"]["top_k"], sent["sampling_params"]["top_p"],
            sent["top_logprobs_num"]) == (-1, 1.0, 0)
    assert (await engine.generate(req(max_tokens=3, temperature=0))).outputs[0].logprobs == [
        -0.5, -1.25, -0.125]  # SGLang's greedy log-probs are already temperature-1
    await engine.close()


def _sglang_answer(logits: torch.Tensor, temperature: float, token: int,
                   num_top: int) -> dict[str, Any]:
    """What SGLang returns for ``token``: log_softmax(logits / T), unfiltered, plus the
    ``num_top`` best of the same log-probs (``python/sglang/srt/layers/sampler.py``)."""
    raw = torch.log_softmax(logits / temperature, dim=-1)
    values, ids = torch.topk(raw, num_top)
    top = [[(int(i), float(v)) for i, v in zip(ids, values, strict=True)]]
    return completion([token], [float(raw[token])], {"type": "length", "length": 1}, top=top)


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (0, 0.8), (4, 0.7), (0, 1.0)])
async def test_filtered_logprobs_equal_the_projects_definition(top_k, top_p):
    """SGLang's unfiltered log-probs, renormalised here, equal engines/sampling.py's."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, generator=gen) * 3
    expected = processed_logprobs(logits[None], torch.tensor([0.7]), torch.tensor([top_k]),
                                  torch.tensor([top_p]))[0]
    token = int(torch.argsort(expected, descending=True)[1])  # a kept token, not the best
    fake = FakeSGLang()
    engine = await attached(fake, top_p_window=32)
    window = top_k or (32 if top_p < 1 else 0)
    fake.responses["POST /generate"] = _sglang_answer(logits, 0.7, token, max(window, 1))
    out = (await engine.generate(req(max_tokens=1, temperature=0.7, top_k=top_k,
                                     top_p=top_p))).outputs[0]
    assert fake.calls[-1][2]["top_logprobs_num"] == window
    assert out.logprobs[0] == pytest.approx(float(expected[token]), abs=1e-6)
    await engine.close()


async def test_top_logprobs_are_processed_and_filtered_ones_are_minus_infinity():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    fake = FakeSGLang(**{"POST /generate": _sglang_answer(logits, 1.0, 1, 4)})
    engine = await attached(fake)
    out = (await engine.generate(req(max_tokens=1, top_k=2, top_logprobs=3))).outputs[0]
    assert fake.calls[-1][2]["top_logprobs_num"] == 3  # max(top_k, top_logprobs)
    expected = processed_logprobs(logits[None], torch.tensor([1.0]), torch.tensor([2]),
                                  torch.tensor([1.0]))[0]
    assert [t for t, _ in out.top_logprobs[0]] == [0, 1, 2]
    assert [lp for _, lp in out.top_logprobs[0]][:2] == pytest.approx(expected[:2].tolist())
    assert out.top_logprobs[0][2][1] == -math.inf
    await engine.close()


async def test_a_nucleus_wider_than_the_window_names_the_fix():
    logits = torch.zeros(64)  # flat: top_p=0.9 needs 58 tokens, the window holds 8
    fake = FakeSGLang(**{"POST /generate": _sglang_answer(logits, 1.0, 0, 8)})
    engine = await attached(fake, top_p_window=8)
    with pytest.raises(EngineError, match=r"nucleus \(top_p=0.9\) reaches beyond the 8 "
                       r"log-probs .* raise SGLangEngine\(top_p_window=...\) or set top_k"):
        await engine.generate(req(max_tokens=1, top_p=0.9))
    await engine.close()


async def test_abort_and_foreign_finish_reasons_labels_and_counts():
    fake = FakeSGLang()
    engine = await attached(fake)
    fake.responses["POST /generate"] = completion(
        [4], [-0.2], {"type": "abort", "message": "Abort before prefill"})
    assert (await engine.generate(req(max_tokens=4))).outputs[0].finish_reason == "abort"
    fake.responses["POST /generate"] = completion([4], [-0.2], {"type": "grammar"})
    with pytest.raises(EngineError, match=r"finished a completion with reason \{'type': 'grammar'\}"):
        await engine.generate(req(max_tokens=4))
    fake.responses["POST /generate"] = completion([4], [-0.2], {"type": "length"},
                                                  label="default")
    with pytest.raises(EngineError, match="weight version 'default', not an integer"):
        await engine.generate(req(max_tokens=4))
    short = completion([4, 5], [-0.2, -0.3], {"type": "length"})
    short["meta_info"]["completion_tokens"] = 3
    fake.responses["POST /generate"] = short
    with pytest.raises(EngineError, match="returned 3 tokens but 2 log-probs"):
        await engine.generate(req(max_tokens=4))
    await engine.close()


async def test_weight_version_spans_give_per_token_versions():
    spanning = completion([1, 2, 3], [-1.0] * 3, {"type": "length"}, label="4")
    spanning["meta_info"]["weight_versions"] = [{"version": "3", "start": 0, "end": 1},
                                                {"version": "4", "start": 1, "end": 3}]
    engine = await attached(FakeSGLang(**{"POST /generate": spanning}))
    assert (await engine.generate(req(max_tokens=3))).outputs[0].versions == [3, 4, 4]
    await engine.close()


# -- errors -------------------------------------------------------------------------------------


async def test_context_overflow_is_caught_before_sending():
    fake = FakeSGLang()
    engine = await attached(fake)
    num_calls = len(fake.calls)
    with pytest.raises(ContextLengthExceeded, match="1000 tokens \\+ max_tokens 100 = 1100"):
        await engine.generate(req([1] * 1000, max_tokens=100))
    with pytest.raises(EngineError, match="empty prompt"):
        await engine.generate(GenerateRequest([], SamplingParams(max_tokens=1)))
    assert len(fake.calls) == num_calls
    await engine.close()


@pytest.mark.parametrize(("status", "body", "error", "text"), [
    (400, {"error": {"message": "The input (2000 tokens) is longer than the model's context "
                                "length (1024 tokens)."}}, ContextLengthExceeded,
     r"SGLang refused POST /generate: The input \(2000 tokens\) is longer"),
    (400, {"object": "error", "message": "1 validation error for GenerateReqInput",
           "type": "Bad Request", "param": None, "code": 400}, EngineError,
     "the SGLang server answered POST /generate with HTTP 400: 1 validation error"),
    (503, None, EngineError, "HTTP 503: Service Unavailable"),
])
async def test_http_errors_become_engine_errors_with_the_servers_message(status, body, error,
                                                                         text):
    fake = FakeSGLang()
    engine = await attached(fake)
    fake.responses["POST /generate"] = httpx2.Response(status, json=body)
    with pytest.raises(error, match=text):
        await engine.generate(req(max_tokens=2))
    assert engine.num_pending == 0
    await engine.close()


async def test_a_server_that_is_down_or_slow_raises_engine_errors():
    fake = FakeSGLang()
    engine = await attached(fake)
    fake.responses["POST /generate"] = httpx2.ConnectError("Connection refused")
    with pytest.raises(EngineUnavailable, match=r"cannot reach the SGLang server at "
                       r"http://sglang.test \(POST /generate: ConnectError"):
        await engine.generate(req(max_tokens=2))
    fake.responses["POST /pause_generation"] = httpx2.ReadTimeout("timed out")
    with pytest.raises(EngineTimeout, match="did not answer POST /pause_generation within 600"):
        await engine.pause()
    await engine.close()
    with pytest.raises(EngineError, match="SGLangEngine is closed"):
        await engine.generate(req(max_tokens=2))


# -- control ------------------------------------------------------------------------------------


async def test_pause_keeps_requests_resume_continues_and_abort_names_sglangs_rids():
    fake = FakeSGLang()
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(body: dict[str, Any]) -> list[dict[str, Any]]:
        arrived.set()
        await release.wait()
        return [completion([5], [-0.1], {"type": "abort"}, rid=f"r9_{i}") for i in range(2)]

    fake.responses["POST /generate"] = slow
    engine = await attached(fake)
    task = asyncio.ensure_future(engine.generate(req(max_tokens=4, n=2, rid="r9")))
    await asyncio.wait_for(arrived.wait(), 5)
    start = len(fake.calls)
    await engine.pause()
    await engine.abort(["r9", "other"])
    await engine.resume()
    await engine.abort()
    await engine.abort([])
    assert fake.calls[start:] == [
        ("POST", "/pause_generation", {"mode": "retract"}),
        ("POST", "/abort_request", {"rid": "r9_0"}), ("POST", "/abort_request", {"rid": "r9_1"}),
        ("POST", "/abort_request", {"rid": "other"}),
        ("POST", "/continue_generation", {}),
        ("POST", "/abort_request", {"rid": "", "abort_all": True})]
    release.set()
    assert [o.finish_reason for o in (await task).outputs] == ["abort", "abort"]
    await engine.close()


async def test_update_weights_pauses_loads_from_disk_relabels_and_continues():
    fake = FakeSGLang()
    engine = await attached(fake)
    start = len(fake.calls)
    embed = torch.arange(6.0).reshape(2, 3)
    await engine.update_weights(WeightUpdate(named_tensors=iter(
        [("model.embed_tokens.weight", embed), ("lm_head.weight", embed)])))
    assert fake.paths(start) == ["POST /pause_generation", "POST /update_weights_from_disk",
                                 "POST /continue_generation"]
    body = fake.calls[start + 1][2]
    assert {k: v for k, v in body.items() if k != "model_path"} == {
        "abort_all_requests": False, "flush_cache": True, "keep_pause": True,
        "weight_version": "4"}
    assert engine.version == 4 and fake.label == "4"
    assert torch.equal(fake.loaded["lm_head.weight"], embed)
    assert not Path(body["model_path"]).exists()  # removed once loaded
    out = (await engine.generate(req(max_tokens=3))).outputs[0]
    assert out.versions == [4, 4, 4]  # sent after the update: the new version
    await engine.close()


async def test_update_from_a_path_while_paused_leaves_the_server_paused(tmp_path):
    fake = FakeSGLang()
    engine = await attached(fake)
    await engine.pause()
    start = len(fake.calls)
    await engine.update_weights(WeightUpdate(path=str(tmp_path), version=9))
    assert fake.paths(start) == ["POST /update_weights_from_disk"]
    assert fake.calls[-1][2]["model_path"] == str(tmp_path)
    assert engine.version == 9 and tmp_path.exists()  # the caller's directory is kept
    await engine.close()


async def test_a_refused_update_keeps_the_version_and_continues():
    refused = httpx2.Response(400, json={
        "success": False, "num_paused_requests": 0,
        "message": "Failed to get weights iterator: /nowhere (repository not found)."})
    fake = FakeSGLang(**{"POST /update_weights_from_disk": refused})
    engine = await attached(fake)
    with pytest.raises(EngineError, match=r"HTTP 400: Failed to get weights iterator: /nowhere"):
        await engine.update_weights(WeightUpdate(path="/nowhere"))
    assert engine.version == 3 and fake.paths()[-1] == "POST /continue_generation"
    await engine.close()


async def test_update_from_tensor_sends_one_payload_per_tp_rank():
    fake = FakeSGLang()
    engine = await attached(fake)
    seen = []

    def serializer(named: Any) -> str:
        seen.append([n for n, _ in named])
        return "cGF5bG9hZA=="

    await engine.update_weights_from_tensor([("w", torch.ones(2))], tp_size=2, version=7,
                                            serializer=serializer)
    assert seen == [["w"]] and engine.version == 7
    assert fake.calls[-2][2] == {"serialized_named_tensors": ["cGF5bG9hZA=="] * 2,
                                 "load_format": None, "flush_cache": True,
                                 "abort_all_requests": False, "weight_version": "7"}
    await engine.close()


async def test_distributed_update_broadcasts_while_the_request_is_in_flight():
    fake = FakeSGLang()
    received, broadcast_done = threading.Event(), threading.Event()

    async def receive(body: dict[str, Any]) -> dict[str, Any]:
        received.set()  # the server now waits in broadcast(src=0)
        assert await asyncio.to_thread(broadcast_done.wait, 5)
        return fake._updated(body)

    fake.responses["POST /update_weights_from_distributed"] = receive
    engine = await attached(fake)
    await engine.init_weights_update_group("10.0.0.1", 29500, rank_offset=1, world_size=2)
    assert fake.calls[-1][2] == {"master_address": "10.0.0.1", "master_port": 29500,
                                 "rank_offset": 1, "world_size": 2,
                                 "group_name": "weight_update_group", "backend": "nccl"}

    def broadcast() -> None:
        assert received.wait(5), "the update request was not in flight"
        broadcast_done.set()

    await engine.update_weights_from_distributed(["w"], ["bfloat16"], [(2, 3)],
                                                 broadcast=broadcast)
    assert engine.version == 4 and broadcast_done.is_set()
    assert fake.calls[-2][2]["shapes"] == [[2, 3]]
    await engine.close()


async def test_a_refused_distributed_update_does_not_wait_for_the_broadcast():
    refused = httpx2.Response(400, json={"success": False, "message": "group not initialized"})
    fake = FakeSGLang(**{"POST /update_weights_from_distributed": refused})
    engine = await attached(fake)
    stop = threading.Event()
    with pytest.raises(EngineError, match="HTTP 400: group not initialized"):
        await engine.update_weights_from_distributed(["w"], ["float32"], [[1]],
                                                     broadcast=lambda: stop.wait(30))
    stop.set()  # let the stuck sender thread go
    assert engine.version == 3 and fake.paths()[-1] == "POST /continue_generation"
    await engine.close()


# -- launching ----------------------------------------------------------------------------------


async def test_launch_without_an_sglang_python_names_the_fix(monkeypatch):
    monkeypatch.delenv("AREAL_AGENTS_SGLANG_PYTHON", raising=False)
    with pytest.raises(ConfigError, match=r"needs python= .* or \$AREAL_AGENTS_SGLANG_PYTHON"):
        await SGLangEngine.launch("model")


async def test_launch_with_a_python_lacking_sglang_shows_the_servers_log(tmp_path):
    with pytest.raises(EngineError, match=r"(?s)exited with code 1 before it was ready.*"
                       r"No module named 'sglang'"):
        await SGLangEngine.launch(tmp_path, python=sys.executable, log_path=tmp_path / "log",
                                  progress=lambda line: None)


async def test_close_stops_a_launched_server_and_removes_own_weight_files(tmp_path):
    server = ServerProcess([sys.executable, "-c", "import time; time.sleep(600)"],
                           tmp_path / "log", grace_s=5)
    fake = FakeSGLang()
    engine = SGLangEngine(URL, max_context=64, server=server,
                          transport=httpx2.MockTransport(fake))
    await engine.update_weights(WeightUpdate(named_tensors=[("w", torch.ones(1))]))
    own = engine._weights_dir
    async with engine:
        assert server.running and own is not None and own.exists()
    assert not server.running and server.proc.returncode == -15 and not own.exists()
    await engine.close()  # idempotent


# -- serving ------------------------------------------------------------------------------------


async def test_an_sglang_placement_with_nccl_is_refused_before_anything_starts(tmp_path):
    from areal_agents.trainers.placement import InferencePlacement
    from areal_agents.trainers.serving import build_engines

    placement = InferencePlacement(kind="sglang", transport="nccl", python=sys.executable)
    with pytest.raises(ConfigError, match="kind='sglang' loads weights from safetensors files "
                       "only \\(transport 'disk'\\), not 'nccl'; SGLang's NCCL"):
        await build_engines("p", placement, None, None, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing saved, no server started


async def test_an_sglang_placement_launches_sglang_on_the_saved_model(tmp_path):
    from areal_agents.models import tiny
    from areal_agents.trainers.placement import InferencePlacement
    from areal_agents.trainers.serving import build_engines

    model, tokenizer = tiny("xs", seed=0)
    placement = InferencePlacement.of({"kind": "sglang", "python": sys.executable,
                                       "server_args": {"context_length": 256}})
    with pytest.raises(EngineError, match="No module named 'sglang'"):  # no SGLang here
        await build_engines("listener", placement, model, tokenizer, tmp_path)
    served = tmp_path / "serving" / "listener"
    assert (served / "config.json").exists()
    log = (served / "logs" / "sglang0.log").read_text()
    assert "No module named 'sglang'" in log


def test_the_sglang_example_yaml_serves_the_listener_with_launch_arguments():
    import inspect

    from areal_agents.config import load_config

    example = Path(__file__).parents[2] / "examples" / "signaling" / "listener_sglang.yaml"
    placement = load_config(example, []).policies["listener"].inference
    assert (placement.kind, placement.resolved_transport()) == ("sglang", "disk")
    assert set(placement.server_args) <= set(inspect.signature(SGLangEngine.launch).parameters)


@pytest.mark.parametrize(("kind", "env"), [("sglang", "AREAL_AGENTS_SGLANG_PYTHON"),
                                           ("vllm", "AREAL_AGENTS_VLLM_PYTHON")])
async def test_a_server_placement_without_an_interpreter_is_refused_before_saving(
        kind, env, monkeypatch, tmp_path):
    from areal_agents.trainers.placement import InferencePlacement
    from areal_agents.trainers.serving import build_engines

    monkeypatch.delenv(env, raising=False)
    with pytest.raises(ConfigError, match=rf"kind='{kind}' launches .* needs python .* "
                       rf"or \${env}"):
        await build_engines("p", InferencePlacement(kind=kind), object(), object(), tmp_path)
    assert not any(tmp_path.iterdir())  # the model was not saved for a server that cannot start


def test_serialized_tensors_are_base64_of_a_forking_pickler_dump():
    """The format SGLang's MultiprocessingSerializer reads (b64decode, then loads); CPU
    tensors load back in this process (across processes only CUDA IPC handles work)."""
    import base64
    import pickle

    from areal_agents.engines.sglang_weights import serialize_tensors

    text = serialize_tensors([("w", torch.arange(4.0)), ("b", torch.ones(2, 2))])
    loaded = pickle.loads(base64.b64decode(text))
    assert [name for name, _ in loaded] == ["w", "b"]
    assert torch.equal(loaded[0][1], torch.arange(4.0)) and torch.equal(loaded[1][1],
                                                                        torch.ones(2, 2))


async def test_concurrent_updates_take_distinct_versions_in_order():
    fake = FakeSGLang()
    engine = await attached(fake)
    tensors = [("w", torch.ones(1))]
    await asyncio.gather(*(engine.update_weights(WeightUpdate(named_tensors=list(tensors)))
                           for _ in range(2)))
    sent = [body["weight_version"] for _, path, body in fake.calls
            if path == "/update_weights_from_disk"]
    assert sent == ["4", "5"] and engine.version == 5 and fake.label == "5"
    await engine.close()
