"""The engine-server protocol, served in process (``httpx2.ASGITransport``): JSON round trips,
auth, errors, and ``RemoteEngine`` giving exactly what the ``LocalEngine`` behind it gives."""

from __future__ import annotations

import asyncio

import httpx2
import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.base import CompletionOutput, GenerateResult
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.remote import RemoteEngine
from areal_agents.engines.service import (
    build_app,
    request_from_json,
    request_to_json,
    result_from_json,
    result_to_json,
)
from areal_agents.errors import ContextLengthExceeded, EngineError, EngineUnavailable
from areal_agents.models import tiny

TOKEN = "test-token"


@pytest.fixture
def model_tok():
    torch.set_num_threads(1)
    return tiny("xs", seed=0)


@pytest.fixture
async def served(model_tok):
    """(server-side LocalEngine, RemoteEngine talking to it through ASGI)."""
    model, tok = model_tok
    # no prefix cache: the tests compare repeated requests of one session bit for bit, and a
    # cache hit's reused keys/values round differently (~1e-7; tests/engines/test_prefix_cache.py)
    engine = LocalEngine(model, tok, max_batch_size=8, prefix_cache_tokens=0)
    transport = httpx2.ASGITransport(app=build_app(engine, TOKEN))
    # "disk": shared memory needs the reader in another process (tests/engines/test_remote.py)
    remote = await RemoteEngine.attach("http://engine", token=TOKEN, http_transport=transport,
                                       transport="disk")
    yield engine, remote
    await remote.close()
    await engine.close()


def _req(prompt: list[int], **kw) -> GenerateRequest:
    return GenerateRequest(list(prompt), SamplingParams(**kw), request_id="r1", session_id="s")


def test_request_and_result_survive_the_json_round_trip():
    req = _req([1, 2, 3], max_tokens=5, temperature=0.7, top_k=4, top_p=0.9, stop=["\n"],
               stop_token_ids=[9], seed=3, n=2, top_logprobs=2)
    assert request_from_json(request_to_json(req)) == req
    with_adapter = GenerateRequest([1, 2], SamplingParams(), adapter="judge")
    assert request_from_json(request_to_json(with_adapter)) == with_adapter
    result = GenerateResult("r1", [1, 2], [CompletionOutput(
        [5, 6], [-0.5, -1.25], [0, 1], "stop", top_logprobs=[[(5, -0.5), (7, -2.0)],
                                                             [(6, -1.25), (8, -3.0)]])])
    assert result_from_json(result_to_json(result)) == result


@pytest.mark.parametrize(("body", "message"), [
    ([1, 2], "the body must be a JSON object with prompt_ids and sampling"),
    ({"prompt_ids": "12"}, "prompt_ids must be a list of integer token ids"),
    ({"prompt_ids": [1], "sampling": [1]}, "sampling must be an object of SamplingParams fields"),
    ({"prompt_ids": [1], "sampling": {"max_tokens": 0}}, "max_tokens must be >= 1, got 0"),
    ({"prompt_ids": [1], "adapter": 3},
     "adapter must be the name of a served LoRA adapter (a string) or null"),
])
def test_bad_generate_bodies_name_the_field(body, message):
    with pytest.raises(ValueError) as info:
        request_from_json(body)
    assert str(info.value) == message


def test_an_empty_token_is_refused():
    with pytest.raises(ValueError, match="needs a non-empty token"):
        build_app(object(), "")


async def test_health_is_open_and_everything_else_needs_the_token(served):
    engine, _ = served
    transport = httpx2.ASGITransport(app=build_app(engine, TOKEN))
    async with httpx2.AsyncClient(transport=transport, base_url="http://engine") as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        for method, path in [("GET", "/version"), ("POST", "/generate"), ("POST", "/pause"),
                             ("POST", "/update_weights/disk")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = await http.request(method, path, headers=headers, json={})
                assert response.status_code == 401
                assert response.json()["error"]["type"] == "unauthorized"
    assert engine.num_pending == 0 and not engine._paused


async def test_bad_control_bodies_are_answered_400_naming_the_field(served):
    engine, _ = served
    transport = httpx2.ASGITransport(app=build_app(engine, TOKEN))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx2.AsyncClient(transport=transport, base_url="http://engine",
                                  headers=auth) as http:
        for path, body, message in [
            ("/update_weights/disk", {}, "'path' (a directory of *.safetensors files) is "
                                         "required"),
            ("/update_weights/stream", {"manifest": {}}, "'manifest' (a weight transport's "
                                                         "manifest()) is required"),
            ("/generate", {"prompt_ids": [1], "sampling": {"top_k": -1}},
             "top_k must be >= 0 (0 disables it), got -1"),
        ]:
            response = await http.post(path, json=body)
            assert response.status_code == 400
            assert response.json() == {"error": {"type": "invalid_request", "message": message}}
        response = await http.post("/pause", content=b"{not json")
        assert response.status_code == 400 and response.json()["error"]["message"].startswith(
            "the body is not JSON: ")
    assert engine.version == 0


async def test_remote_engine_gives_the_local_engines_exact_ids_logprobs_and_versions(
        served, model_tok):
    engine, remote = served
    _, tok = model_tok
    assert (remote.version, remote.max_context) == (0, engine.max_context)
    prompt = tok.encode("12 + 30 = ? Answer:")
    for kw in ({"temperature": 0}, {"temperature": 0.8, "top_k": 5, "seed": 7, "n": 2},
               {"temperature": 1.0, "top_p": 0.9, "seed": 1, "top_logprobs": 3}):
        via_http = await remote.generate(_req(prompt, max_tokens=12, **kw))
        in_process = await engine.generate(_req(prompt, max_tokens=12, **kw))
        assert via_http == in_process  # ids, log-probs, versions, finish, top log-probs


async def test_errors_come_back_as_engine_errors(served):
    engine, remote = served
    with pytest.raises(ContextLengthExceeded, match="exceeds the context window"):
        await remote.generate(_req([1, 2], max_tokens=engine.max_context))
    with pytest.raises(EngineError, match=r"HTTP 500: prompt_ids outside the vocabulary"):
        await remote.generate(_req([10**7], max_tokens=2))
    with pytest.raises(EngineError, match=r"HTTP 400: no \*.safetensors files in "):
        await remote.update_weights(WeightUpdate(path="/nonexistent/dir"))
    assert remote.version == 0


async def test_weight_update_over_http_bumps_the_version_and_changes_outputs(served, model_tok):
    engine, remote = served
    _, tok = model_tok
    prompt = tok.encode("1 + 2 =")
    before = (await remote.generate(_req(prompt, max_tokens=8, temperature=0))).outputs[0]
    other, _ = tiny("xs", seed=1)
    await remote.update_weights(WeightUpdate(named_tensors=iter(list(
        other.state_dict().items()))))
    assert remote.version == engine.version == 1
    assert torch.equal(engine.model.model.layers[0].mlp.up_proj.weight,
                       other.model.layers[0].mlp.up_proj.weight)
    after = (await remote.generate(_req(prompt, max_tokens=8, temperature=0))).outputs[0]
    assert after.versions == [1] * 8 and before.versions == [0] * 8
    assert after.logprobs != before.logprobs
    fresh = await engine.generate(_req(prompt, max_tokens=8, temperature=0))
    assert fresh.outputs[0] == after


async def test_a_shared_memory_stream_update_loads_the_same_weights(served):
    engine, remote = served
    remote.transport = "shm"
    other, _ = tiny("xs", seed=1)
    await remote.update_weights(WeightUpdate(named_tensors=iter(list(
        other.state_dict().items())), version=5))
    assert remote.version == engine.version == 5
    for name, tensor in other.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name
    await remote.update_weights(WeightUpdate(named_tensors=iter(list(  # the block is reused
        tiny("xs", seed=2)[0].state_dict().items()))))
    assert engine.version == 6
    await remote.close()  # unlinks the block


async def test_a_dropped_keep_alive_connection_is_retried_once_not_a_dead_server(served):
    """A pooled connection the server closed fails with ReadError; the run lost its only
    replica to this before (all later episodes failed)."""
    engine, _ = served
    app_transport = httpx2.ASGITransport(app=build_app(engine, TOKEN))
    failures: list[type[Exception]] = [httpx2.RemoteProtocolError]

    async def flaky(request: httpx2.Request) -> httpx2.Response:
        if failures and request.url.path == "/generate":
            raise failures.pop(0)("connection closed", request=request)
        return await app_transport.handle_async_request(request)

    remote = await RemoteEngine.attach("http://engine", token=TOKEN,
                                       http_transport=httpx2.MockTransport(flaky))
    out = await remote.generate(_req([1, 2, 3], max_tokens=2))  # fails, then a retry
    assert len(out.outputs[0].token_ids) == 2 and failures == []
    failures[:] = [httpx2.ReadError, httpx2.ReadError]
    with pytest.raises(EngineError) as info:  # twice: an error, but not "unavailable"
        await remote.generate(_req([1, 2, 3], max_tokens=2))
    assert not isinstance(info.value, EngineUnavailable)
    assert "(POST /generate: ReadError: connection closed); is it running?" in str(info.value)
    await remote.close()


async def test_a_stream_update_to_a_dead_server_fails_without_waiting_for_the_reader():
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    remote = RemoteEngine("http://127.0.0.1:9", token=TOKEN, max_context=64, transport="shm",
                          http_transport=httpx2.MockTransport(refuse))
    with pytest.raises(EngineUnavailable, match="POST /update_weights/stream"):
        await remote.update_weights(WeightUpdate(named_tensors=iter([("w", torch.ones(4))])))
    assert remote.version == 0
    await remote.close()


async def test_pause_holds_in_flight_requests_and_an_update_meanwhile_shows_in_versions(
        served, model_tok):
    engine, remote = served
    _, tok = model_tok
    task = asyncio.ensure_future(remote.generate(_req(tok.encode("x"), max_tokens=40,
                                                      temperature=0)))
    for _ in range(2000):
        if any(len(s.token_ids) >= 2 for s in engine._running):
            break
        await asyncio.sleep(0.002)
    await remote.pause()
    held = len(engine._running[0].token_ids)
    await asyncio.sleep(0.05)
    assert len(engine._running[0].token_ids) == held and not task.done()
    other, _ = tiny("xs", seed=1)
    await remote.update_weights(WeightUpdate(named_tensors=iter(list(
        other.state_dict().items()))))
    assert not task.done()
    await remote.resume()
    out = (await task).outputs[0]
    assert len(out.token_ids) == 40 and out.versions == [0] * held + [1] * (40 - held)


async def test_an_unreachable_server_is_unavailable():
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    remote = RemoteEngine("http://127.0.0.1:9", token=TOKEN, max_context=64,
                          http_transport=httpx2.MockTransport(refuse))
    with pytest.raises(EngineUnavailable, match=r"cannot reach the engine server at "
                       r"http://127.0.0.1:9 \(POST /generate: ConnectError"):
        await remote.generate(_req([1], max_tokens=2))
    assert remote.num_pending == 0
    await remote.close()


async def test_a_request_names_its_adapter_and_an_unserved_one_is_refused(served, model_tok):
    """The server answers with the adapter a request names (never silently the base), and
    refuses, 400, one it does not serve, on /generate and /generate/stream."""
    engine, remote = served
    _, tok = model_tok
    prompt = tok.encode("12 + 30 = ? Answer:")
    view = engine.add_adapter("judge", rank=2, target_modules=["q_proj"])
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in engine.model.named_modules():
        if name.endswith("q_proj"):
            peft = f"base_model.model.{name}"
            tensors[f"{peft}.lora_A.weight"] = torch.randn(2, module.in_features, generator=gen)
            tensors[f"{peft}.lora_B.weight"] = torch.randn(module.out_features, 2,
                                                           generator=gen)
    await view.update_weights(WeightUpdate(named_tensors=tensors.items()))
    greedy = SamplingParams(max_tokens=8, temperature=0)
    ask = lambda adapter: GenerateRequest(prompt, greedy, adapter=adapter)  # noqa: E731
    via_http, base = await remote.generate(ask("judge")), await remote.generate(ask(None))
    assert via_http.outputs == (await view.generate(ask(None))).outputs
    assert via_http.outputs[0].versions == [1] * len(via_http.outputs[0].versions)
    assert via_http.outputs[0].logprobs != base.outputs[0].logprobs  # not the base model
    transport = httpx2.ASGITransport(app=build_app(engine, TOKEN))
    async with httpx2.AsyncClient(transport=transport, base_url="http://engine",
                                  headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for path in ("/generate", "/generate/stream"):
            response = await http.post(path, json={"prompt_ids": prompt, "adapter": "solver"})
            assert response.status_code == 400
            assert response.json()["error"] == {
                "type": "invalid_request",
                "message": "adapter 'solver' is not served here (adapters: ['judge']); send "
                           "adapter null for the base model"}
    assert engine.num_pending == 0
