"""``SGLangEngine.generate_streaming`` against a fake SGLang server speaking its stream format.

SGLang does not run here (no CPU wheel; ``test_sglang_live.py`` needs a GPU), so
``FakeSGLangServer`` (Starlette under uvicorn, real HTTP) streams ``/generate`` as
sgl-project/sglang's ``http_server.py`` does -- ``data: {json}\\n\\n`` per event, then
``data: [DONE]\\n\\n``, an error as ``data: {"error": {"message"}}`` -- with events built like
``tokenizer_manager``'s output processor: the completion so far by default, only the new
entries under ``--incremental-streaming-output``, ``index`` for ``n > 1``,
``meta_info.finish_reason`` null until the last event. After its first event it waits for the
test (a ``threading.Event``: the server runs on its own thread and loop), so a delta seen
while it waits left before the completion existed.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.engines.base import TokenDelta
from areal_agents.engines.sglang import SGLangEngine
from areal_agents.errors import ContextLengthExceeded, EngineError
from areal_agents.gateway.server import ServerThread

# two completions: ids, SGLang's log-probs (after temperature, before filtering), top rows
SCRIPT = [
    ([11, 12, 13, 2], [-0.5, -1.25, -0.75, -0.125],
     [[(11, -0.5), (14, -1.0), (15, -2.0)], [(12, -1.25), (16, -0.5), (17, -3.0)],
      [(13, -0.75), (18, -0.8), (19, -1.5)], [(2, -0.125), (20, -3.0), (21, -4.0)]]),
    ([31, 32, 33], [-0.25, -2.0, -0.5],
     [[(31, -0.25), (34, -2.0), (35, -2.5)], [(32, -2.0), (36, -0.1), (37, -2.2)],
      [(33, -0.5), (38, -1.5), (39, -1.7)]]),
]
FINISH = [{"type": "stop", "matched": 2}, {"type": "length", "length": 3}]


def _meta(k: int, upto: int, start: int, label: str) -> dict[str, Any]:
    """``meta_info`` of completion ``k`` after ``upto`` tokens, listing entries ``start:``."""
    ids, lps, top = SCRIPT[k]
    done = upto == len(ids)
    return {"id": f"r_{k}", "finish_reason": FINISH[k] if done else None, "prompt_tokens": 5,
            "weight_version": label, "completion_tokens": upto, "cached_tokens": 0,
            "output_token_logprobs": [[lp, t, None] for lp, t in
                                      zip(lps[start:upto], ids[start:upto], strict=True)],
            "output_top_logprobs": [[[lp, t, None] for t, lp in row]
                                    for row in top[start:upto]]}


class FakeSGLangServer:
    """``POST /generate`` streamed (``incremental``: SGLang's ``--incremental-streaming-output``)
    or whole; ``bodies`` logs what it was sent; ``disconnected`` is set when a client closed a
    stream before its end; ``fail_after_first``: an error event after the first event."""

    def __init__(self, incremental: bool = False, fail_after_first: str | None = None,
                 bad_after_first: dict[str, Any] | None = None) -> None:
        self.incremental, self.fail_after_first = incremental, fail_after_first
        self.bad_after_first = bad_after_first
        self.release, self.first_sent = threading.Event(), threading.Event()
        self.disconnected = threading.Event()
        self.bodies: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/generate", self.generate, methods=["POST"])])

    async def generate(self, request: Request) -> Any:
        body = await request.json()
        self.bodies.append(body)
        n = body["sampling_params"]["n"]
        if len(body["input_ids"]) > 1000:
            return JSONResponse({"error": {"message": "The input (1001 tokens) is longer than "
                                           "the model's context length (1024 tokens)."}},
                                status_code=400)
        if not body["stream"]:
            items = [{"text": "", "output_ids": SCRIPT[k][0],
                      "meta_info": _meta(k, len(SCRIPT[k][0]), 0, "3")} for k in range(n)]
            return JSONResponse(items if n > 1 else items[0])
        return StreamingResponse(self._events(n), media_type="text/event-stream")

    async def _events(self, n: int):
        finished = False
        try:
            longest = max(len(SCRIPT[k][0]) for k in range(n))
            for step in range(1, longest + 1):
                for k in range(n):
                    if step > len(SCRIPT[k][0]):
                        continue
                    start = step - 1 if self.incremental else 0
                    ids = SCRIPT[k][0][start:step]
                    item = {"text": "", "output_ids": ids, "meta_info": _meta(k, step, start, "3")}
                    if n > 1:
                        item["index"] = k
                    yield f"data: {json.dumps(item)}\n\n"
                if step == 1:
                    self.first_sent.set()
                    if self.fail_after_first:
                        yield f"data: {json.dumps({'error': {'message': self.fail_after_first}})}\n\n"
                        break
                    if self.bad_after_first is not None:
                        yield f"data: {json.dumps(self.bad_after_first)}\n\n"
                    while not self.release.is_set():
                        await asyncio.sleep(0.01)
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.disconnected.set()


async def _wait(event: threading.Event, what: str) -> None:
    for _ in range(1000):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _request(n: int = 2, **sampling: Any) -> GenerateRequest:
    return GenerateRequest([1, 20, 30, 40, 50], SamplingParams(
        max_tokens=4, temperature=1.0, n=n, **sampling), request_id="r")


@pytest.mark.parametrize("incremental", [False, True], ids=["cumulative", "incremental"])
async def test_deltas_leave_before_the_end_and_concatenate_to_generates_answer(incremental):
    server = FakeSGLangServer(incremental=incremental)
    with ServerThread(server.app) as thread:
        engine = SGLangEngine(thread.url, max_context=1024, version=3)
        deltas: list[TokenDelta] = []
        sp = {"top_k": 2, "top_logprobs": 2}  # processed log-probs, as generate's
        task = asyncio.create_task(engine.generate_streaming(_request(**sp), deltas.append))
        await _wait(server.first_sent, "the first event")
        for _ in range(500):
            if len(deltas) == 2:
                break
            await asyncio.sleep(0.01)
        assert [(d.index, d.token_ids) for d in deltas] == [(0, [11]), (1, [31])]
        assert not task.done() and engine.num_pending == 1  # the server holds the rest
        server.release.set()
        streamed = await task
        whole = await engine.generate(_request(**sp))
        await engine.close()
    assert server.bodies[0]["stream"] is True and server.bodies[1]["stream"] is False
    assert streamed.outputs == whole.outputs
    for i, out in enumerate(streamed.outputs):
        mine = [d for d in deltas if d.index == i]
        assert [d.token_ids for d in mine] == [[t] for t in SCRIPT[i][0]]  # one a step
        assert [x for d in mine for x in d.logprobs] == out.logprobs
        assert [x for d in mine for x in d.top_logprobs] == out.top_logprobs
        assert [x for d in mine for x in d.versions] == out.versions == [3] * len(mine)
    assert [o.finish_reason for o in streamed.outputs] == ["stop", "length"]
    assert streamed.outputs[0].logprobs[0] != SCRIPT[0][1][0]  # renormalised over top-k


async def test_cancelling_the_caller_closes_the_stream_on_the_server():
    server = FakeSGLangServer()
    with ServerThread(server.app) as thread:
        engine = SGLangEngine(thread.url, max_context=1024)
        task = asyncio.create_task(engine.generate_streaming(_request(), lambda d: None))
        await _wait(server.first_sent, "the first event")
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait(server.disconnected, "the server to see the stream closed")
        assert engine.num_pending == 0 and engine._in_flight == {}
        await engine.close()
    assert not server.release.is_set()  # closed mid-completion, not at its end


async def test_an_error_event_mid_stream_is_an_engine_error():
    server = FakeSGLangServer(fail_after_first="CUDA out of memory")
    with ServerThread(server.app) as thread:
        engine = SGLangEngine(thread.url, max_context=1024)
        deltas: list[TokenDelta] = []
        with pytest.raises(EngineError, match="CUDA out of memory"):
            await engine.generate_streaming(_request(n=1), deltas.append)
        await engine.close()
    assert [d.token_ids for d in deltas] == [[11]]


async def test_a_context_overflow_the_server_reports_is_context_length_exceeded():
    server = FakeSGLangServer()
    with ServerThread(server.app) as thread:
        engine = SGLangEngine(thread.url, max_context=4096)  # the server's is smaller
        with pytest.raises(ContextLengthExceeded, match="context length"):
            await engine.generate_streaming(
                GenerateRequest(list(range(1, 1002)), SamplingParams(max_tokens=4)),
                lambda d: None)
        await engine.close()


async def test_an_event_the_engine_cannot_read_closes_the_stream_at_once():
    foreign = {"text": "", "output_ids": [7], "index": 5, "meta_info": _meta(0, 1, 0, "3")}
    server = FakeSGLangServer(bad_after_first=foreign)
    with ServerThread(server.app) as thread:
        engine = SGLangEngine(thread.url, max_context=1024)
        with pytest.raises(EngineError, match="n=2"):
            await engine.generate_streaming(_request(), lambda d: None)
        await _wait(server.disconnected, "the server to see the stream closed")
        await engine.close()
    assert not server.release.is_set()  # not left open until garbage collection
