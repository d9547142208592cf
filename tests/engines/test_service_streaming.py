"""The engine server's ``POST /generate/stream`` served in process (``httpx2.ASGITransport``,
which hands the body over whole: the order and content of events, not their timing; timing
is ``test_remote_streaming.py``'s, against a real server process)."""

from __future__ import annotations

import json

import httpx2
import pytest

from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.engines.base import (
    CompletionOutput,
    GenerateResult,
    InferenceEngine,
    OnTokens,
    TokenDelta,
)
from areal_agents.engines.remote import RemoteEngine
from areal_agents.engines.service import build_app, result_to_json
from areal_agents.errors import ContextLengthExceeded, EngineError

TOKEN = "test-token"


class FailingEngine(InferenceEngine):
    """Streams ``ids`` one token a delta, failing with ``fail`` after ``fail_after`` deltas
    (None: never)."""

    max_context = 64

    def __init__(self, ids: list[int], fail: Exception | None = None,
                 fail_after: int = 0) -> None:
        self.ids, self.fail, self.fail_after = ids, fail, fail_after

    async def generate_streaming(self, request: GenerateRequest,
                                 on_tokens: OnTokens) -> GenerateResult:
        for k, tok in enumerate(self.ids):
            if self.fail is not None and k == self.fail_after:
                raise self.fail
            on_tokens(TokenDelta(0, [tok], [-0.25 * k], [3], [[(tok, -0.25 * k)]]))
        out = CompletionOutput(list(self.ids), [-0.25 * k for k in range(len(self.ids))],
                               [3] * len(self.ids), "length",
                               [[(t, -0.25 * k)] for k, t in enumerate(self.ids)])
        return GenerateResult(request.request_id, list(request.prompt_ids), [out])


async def _remote(engine: InferenceEngine) -> RemoteEngine:
    return RemoteEngine("http://engine", token=TOKEN, max_context=64,
                        http_transport=httpx2.ASGITransport(app=build_app(engine, TOKEN)))


def _req() -> GenerateRequest:
    return GenerateRequest([1, 2], SamplingParams(max_tokens=3), request_id="r1")


async def test_events_are_the_deltas_then_the_generate_answer_then_done():
    engine = FailingEngine([7, 8, 9])
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=build_app(engine, TOKEN)),
                                  base_url="http://engine") as http:
        answer = await http.post("/generate/stream", json={"prompt_ids": [1, 2],
                                                           "request_id": "r1"},
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in answer.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert [e["delta"]["token_ids"] for e in parsed[:3]] == [[7], [8], [9]]
    assert parsed[0]["delta"] == {"index": 0, "token_ids": [7], "logprobs": [0.0],
                                  "versions": [3], "top_logprobs": [[[7, 0.0]]]}
    expected = await engine.generate_streaming(_req(), lambda d: None)
    assert parsed[3] == {"result": json.loads(json.dumps(result_to_json(expected)))}


async def test_remote_engine_hands_over_the_deltas_and_returns_the_result():
    remote = await _remote(FailingEngine([7, 8, 9]))
    deltas: list[TokenDelta] = []
    result = await remote.generate_streaming(_req(), deltas.append)
    await remote.close()
    assert deltas == [TokenDelta(0, [t], [-0.25 * k], [3], [[(t, -0.25 * k)]])
                      for k, t in enumerate([7, 8, 9])]
    assert result == await FailingEngine([7, 8, 9]).generate_streaming(_req(), lambda d: None)
    assert remote.num_pending == 0


@pytest.mark.parametrize(("fail", "raised", "message"), [
    (ContextLengthExceeded("prompt too long"), ContextLengthExceeded, "prompt too long"),
    (EngineError("weights gone"), EngineError, "HTTP 500: weights gone"),
    (RuntimeError("bug"), EngineError, "HTTP 500: RuntimeError: bug"),
], ids=["context", "engine-error", "other"])
async def test_a_failure_before_the_first_token_is_generates_http_error(fail, raised, message):
    remote = await _remote(FailingEngine([7, 8], fail=fail, fail_after=0))
    deltas: list[TokenDelta] = []
    with pytest.raises(raised, match=message):
        await remote.generate_streaming(_req(), deltas.append)
    await remote.close()
    assert deltas == [] and remote.num_pending == 0


async def test_a_failure_mid_stream_is_an_error_event_after_the_deltas_sent():
    remote = await _remote(FailingEngine([7, 8, 9], fail=EngineError("out of memory"),
                                         fail_after=2))
    deltas: list[TokenDelta] = []
    with pytest.raises(EngineError, match=r"failed POST /generate/stream \(stream\): out of memory"):
        await remote.generate_streaming(_req(), deltas.append)
    await remote.close()
    assert [d.token_ids for d in deltas] == [[7], [8]]


async def test_a_stream_without_its_result_is_an_engine_error():
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, text='data: {"delta": {"index": 0, "token_ids": [5], '
                               '"logprobs": [-1.0], "versions": [0]}}\n\ndata: [DONE]\n\n')

    remote = RemoteEngine("http://engine", token=TOKEN, max_context=64,
                          http_transport=httpx2.MockTransport(handler))
    with pytest.raises(EngineError, match="without its result"):
        await remote.generate_streaming(_req(), lambda d: None)
    await remote.close()
