"""``VLLMEngine.generate_streaming`` against vLLM 0.32's stream format (no server).

The streamed bodies are the recorded whole answers of ``data/vllm_0.32_responses.json`` cut
the way vLLM's streaming generators cut them (``serve_tokens_stream_generator``,
``completion_stream_generator``): one chunk per choice and decode step with that step's
tokens and log-probs, the finish reason (and on ``/inference/v1/generate`` the whole
completion's ``weight_versions`` spans) on the last, then ``data: [DONE]``. The real server is
exercised by ``test_vllm_streaming_live.py``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx2
import pytest

from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.engines.base import TokenDelta
from areal_agents.engines.vllm import VLLMEngine
from areal_agents.errors import ContextLengthExceeded, EngineError, EngineUnavailable

RECORDED = json.loads((Path(__file__).parent / "data" / "vllm_0.32_responses.json").read_text())
GENERATE = RECORDED["POST /inference/v1/generate"]
SPANNING = RECORDED["POST /inference/v1/generate (spanning an update)"]
COMPLETIONS = RECORDED["POST /v1/completions"]


def _generate_chunks(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole ``/inference/v1/generate`` answer as the stream of one-token chunks."""
    chunks = []
    for choice in response["choices"]:
        content = choice["logprobs"]["content"]
        for k, token in enumerate(choice["token_ids"]):
            last = k == len(choice["token_ids"]) - 1
            chunks.append({"request_id": response["request_id"], "choices": [{
                "index": choice["index"], "token_ids": [token],
                "logprobs": {"content": [content[k]]},
                "finish_reason": choice["finish_reason"] if last else None,
                "weight_versions": choice["weight_versions"] if last else None}]})
    return chunks


def _completions_chunks(response: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    for choice in response["choices"]:
        lps = choice["logprobs"]
        for k, token in enumerate(choice["token_ids"]):
            last = k == len(choice["token_ids"]) - 1
            chunks.append({"id": response["id"], "object": "text_completion", "choices": [{
                "index": choice["index"], "text": lps["tokens"][k], "token_ids": [token],
                "logprobs": {"tokens": [lps["tokens"][k]],
                             "token_logprobs": [lps["token_logprobs"][k]]},
                "finish_reason": choice["finish_reason"] if last else None}]})
    return chunks


def _sse(events: list[Any], done: bool = True) -> bytes:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    return (body + ("data: [DONE]\n\n" if done else "")).encode()


class StreamingVLLM:
    """A ``MockTransport`` handler answering streamed requests with ``answer`` (SSE bytes or
    an ``httpx2.Response``); records the bodies it was sent."""

    def __init__(self, answer: bytes | httpx2.Response | Exception) -> None:
        self.answer = answer
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.bodies.append(json.loads(request.content))
        if isinstance(self.answer, Exception):
            raise self.answer
        if isinstance(self.answer, httpx2.Response):
            return self.answer
        return httpx2.Response(200, content=self.answer,
                               headers={"content-type": "text/event-stream"})


def _engine(handler: StreamingVLLM, endpoint: str = "generate", version: int = 3) -> VLLMEngine:
    return VLLMEngine("http://vllm.test", model="/tmp/vllm_work/model_s0", max_context=1024,
                      endpoint=endpoint, version=version,  # type: ignore[arg-type]
                      transport=httpx2.MockTransport(handler))


def _request(recorded: dict[str, Any]) -> GenerateRequest:
    sp = recorded["sampling_params"]
    return GenerateRequest(recorded["token_ids"], SamplingParams(
        max_tokens=sp["max_tokens"], temperature=sp["temperature"], n=sp["n"], seed=sp.get("seed"),
        stop_token_ids=sp.get("stop_token_ids", []), top_logprobs=max(sp["logprobs"] - 1, 0)),
        request_id=recorded["request_id"])


async def _whole(recorded: dict[str, Any], endpoint: str = "generate"):
    """What ``generate`` makes of the recorded whole answer."""
    fake = httpx2.MockTransport(lambda r: httpx2.Response(200, json=recorded["response"]))
    engine = VLLMEngine("http://vllm.test", model="m", max_context=1024,
                        endpoint=endpoint, version=3, transport=fake)  # type: ignore[arg-type]
    request = (_request(recorded["request"]) if endpoint == "generate" else GenerateRequest(
        recorded["request"]["prompt"], SamplingParams(max_tokens=3, seed=3)))
    return await engine.generate(request)


async def test_generate_stream_concatenates_to_what_generate_returns():
    fake = StreamingVLLM(_sse(_generate_chunks(GENERATE["response"])))
    engine = _engine(fake)
    deltas: list[TokenDelta] = []
    result = await engine.generate_streaming(_request(GENERATE["request"]), deltas.append)
    whole = await _whole(GENERATE)
    assert fake.bodies[0] == {**GENERATE["request"], "stream": True}
    assert len(deltas) == sum(len(o.token_ids) for o in result.outputs)  # one per chunk
    for i, out in enumerate(result.outputs):
        mine = [d for d in deltas if d.index == i]
        assert [t for d in mine for t in d.token_ids] == out.token_ids
        assert [x for d in mine for x in d.logprobs] == out.logprobs
        assert [x for d in mine for x in d.top_logprobs] == out.top_logprobs
        assert [v for d in mine for v in d.versions] == out.versions
    assert result.outputs == whole.outputs
    assert engine.num_pending == 0


async def test_the_final_spans_give_the_versions_of_a_stream_spanning_an_update():
    fake = StreamingVLLM(_sse(_generate_chunks(SPANNING["response"])))
    deltas: list[TokenDelta] = []
    result = await _engine(fake).generate_streaming(_request(SPANNING["request"]),
                                                    deltas.append)
    whole = await _whole(SPANNING)
    assert [o.versions for o in result.outputs] == [o.versions for o in whole.outputs]
    assert len(set(result.outputs[0].versions)) == 2  # the recorded answer spans an update


async def test_completions_stream_tags_tokens_with_the_version_at_send_time():
    fake = StreamingVLLM(_sse(_completions_chunks(COMPLETIONS["response"])))
    deltas: list[TokenDelta] = []
    request = GenerateRequest(COMPLETIONS["request"]["prompt"],
                              SamplingParams(max_tokens=3, seed=3))
    result = await _engine(fake, "completions").generate_streaming(request, deltas.append)
    whole = await _whole(COMPLETIONS, "completions")
    assert fake.bodies[0]["stream"] is True and fake.bodies[0]["return_token_ids"] is True
    assert result.outputs == whole.outputs
    assert [d.token_ids for d in deltas] == [[t] for t in whole.outputs[0].token_ids]
    assert all(d.versions == [3] for d in deltas)


async def test_an_error_event_mid_stream_is_an_engine_error_after_the_first_tokens():
    chunks = _generate_chunks(GENERATE["response"])[:2]
    error = {"error": {"message": "engine core died", "type": "InternalServerError",
                       "code": 500}}
    deltas: list[TokenDelta] = []
    with pytest.raises(EngineError, match="engine core died"):
        await _engine(StreamingVLLM(_sse([*chunks, error]))).generate_streaming(
            _request(GENERATE["request"]), deltas.append)
    assert len(deltas) == 2  # what arrived before the error was delivered


@pytest.mark.parametrize("cut", ["no [DONE]", "unfinished choice"])
async def test_a_stream_cut_short_is_an_engine_error(cut):
    chunks = _generate_chunks(GENERATE["response"])
    body = _sse(chunks, done=False) if cut == "no [DONE]" else _sse(chunks[:-1])
    with pytest.raises(EngineError, match=r"without \[DONE\]|before completion 1 finished"):
        await _engine(StreamingVLLM(body)).generate_streaming(_request(GENERATE["request"]),
                                                              lambda d: None)


async def test_http_errors_map_as_for_generate():
    overflow = RECORDED["POST /v1/completions (400)"]["response"]
    fake = StreamingVLLM(httpx2.Response(400, json=overflow))
    with pytest.raises(ContextLengthExceeded, match="max_model_len"):
        await _engine(fake, "completions").generate_streaming(
            GenerateRequest([1, 2], SamplingParams(max_tokens=3)), lambda d: None)
    fake = StreamingVLLM(httpx2.Response(500, json={"error": {"message": "boom"}}))
    with pytest.raises(EngineError, match="HTTP 500: boom"):
        await _engine(fake).generate_streaming(GenerateRequest([1, 2]), lambda d: None)
    fake = StreamingVLLM(httpx2.ConnectError("connection refused"))
    with pytest.raises(EngineUnavailable, match="connection refused"):
        await _engine(fake).generate_streaming(GenerateRequest([1, 2]), lambda d: None)


async def test_a_foreign_finish_reason_or_short_logprobs_are_errors():
    chunks = copy.deepcopy(_generate_chunks(GENERATE["response"]))
    chunks[-1]["choices"][0]["finish_reason"] = "error"
    with pytest.raises(EngineError, match="reason 'error'"):
        await _engine(StreamingVLLM(_sse(chunks))).generate_streaming(
            _request(GENERATE["request"]), lambda d: None)
    chunks = copy.deepcopy(_generate_chunks(GENERATE["response"]))
    chunks[0]["choices"][0]["logprobs"]["content"] = []
    with pytest.raises(EngineError, match="1 tokens but 0 log-probs"):
        await _engine(StreamingVLLM(_sse(chunks))).generate_streaming(
            _request(GENERATE["request"]), lambda d: None)


async def test_an_adapter_view_streams_with_its_own_version():
    fake = StreamingVLLM(_sse(_generate_chunks(GENERATE["response"])))
    engine = _engine(fake)
    adapter = engine.add_adapter("a1")
    deltas: list[TokenDelta] = []
    result = await adapter.generate_streaming(_request(GENERATE["request"]), deltas.append)
    assert fake.bodies[0]["model"] == engine.model  # not loaded yet: the base model serves
    assert fake.bodies[0]["stream"] is True
    assert all(o.versions == [adapter.version] * len(o.token_ids) for o in result.outputs)
    assert [v for d in deltas for v in d.versions] == [adapter.version] * len(deltas)
    assert adapter.version != engine.version  # the server's span labels (3) are not used
