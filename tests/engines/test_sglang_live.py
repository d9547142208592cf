"""``SGLangEngine`` on a real SGLang server (GPU), one server for the whole module.

Runs when CUDA is available and ``$AREAL_AGENTS_SGLANG_PYTHON`` is the interpreter of a venv
with SGLang (``docs/inference_servers.md``). **Not run yet**: the machines this project was
built on have no GPU. The server serves the tiny "s" model in float32; every check compares it
with this project's own code on the same weights (``LocalEngine`` tokens,
``FSDPEngine.forward_logprobs`` log-probs).
"""

from __future__ import annotations

import asyncio
import copy
import os

import pytest
import pytest_asyncio
import torch

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.sglang import SGLANG_PYTHON_ENV, SGLangEngine
from areal_agents.gateway import Gateway
from areal_agents.models import tiny
from areal_agents.samples import collate

PYTHON = os.environ.get(SGLANG_PYTHON_ENV)
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="SGLang needs a CUDA device"),
    pytest.mark.skipif(not PYTHON, reason=f"${SGLANG_PYTHON_ENV} is not set (a python with "
                       "sglang; see docs/inference_servers.md)"),
    pytest.mark.asyncio(loop_scope="module"),
]
PROMPT = [1, 20, 30, 40, 50, 60, 70]


@pytest.fixture(scope="module")
def models():
    return tiny("s", seed=0), tiny("s", seed=1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(models, tmp_path_factory):
    (model, tokenizer), _ = models
    folder = tmp_path_factory.mktemp("sglang") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    engine = await SGLangEngine.launch(
        folder, python=PYTHON, dtype="float32", context_length=1024, mem_fraction_static=0.3,
        server_args=["--disable-cuda-graph", "--sampling-backend", "pytorch"],
        log_path=folder.parent / "server.log",
        top_p_window=1024)  # the whole vocabulary: a random model's nucleus is wide
    yield engine
    await engine.close()
    assert not engine.server.running


async def _greedy(engine, prompt: list[int], max_tokens: int = 12):
    request = GenerateRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
    return (await engine.generate(request)).outputs[0]


async def _local_greedy(model, tokenizer, prompt: list[int], max_tokens: int = 12):
    async with LocalEngine(copy.deepcopy(model), tokenizer) as local:
        return await _greedy(local, prompt, max_tokens)


async def test_greedy_tokens_and_logprobs_match_local_engine(engine, models):
    (model, tokenizer), _ = models
    out, ref = await _greedy(engine, PROMPT), await _local_greedy(model, tokenizer, PROMPT)
    assert out.token_ids == ref.token_ids and len(out.token_ids) == 12
    assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs, strict=True)) < 1e-3
    assert out.versions == [engine.version] * 12 and out.finish_reason == "length"


async def test_n_samples_and_stop_token_ids(engine, models):
    (model, tokenizer), _ = models
    sp = SamplingParams(max_tokens=8, temperature=1.0, n=2, top_logprobs=3)
    outs = (await engine.generate(GenerateRequest(PROMPT, sp))).outputs
    assert len(outs) == 2 and all(len(o.token_ids) == len(o.logprobs) for o in outs)
    ref = await _local_greedy(model, tokenizer, PROMPT[:3], max_tokens=16)
    stop = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[ref.token_ids[3]])
    got = (await engine.generate(GenerateRequest(PROMPT[:3], stop))).outputs[0]
    assert got.token_ids == ref.token_ids[:4] and got.finish_reason == "stop"


@pytest.mark.parametrize("combos", [
    [(1.0, 0, 1.0)] * 3,
    [(0.7, 0, 0.9)] * 3,
    [(0.7, 5, 0.9), (1.3, 5, 1.0), (0.0, 0, 1.0)],
], ids=["t1", "t0.7-top_p0.9", "top_k-and-greedy"])
async def test_behaviour_logprobs_match_the_trainers_recompute(engine, models, combos):
    from areal_agents.trainers.fsdp import FSDPEngine

    (model, tokenizer), _ = models
    gateway = Gateway()
    gateway.add_policy("policy", [engine], tokenizer)
    samples = []
    for i, (temperature, top_k, top_p) in enumerate(combos):
        key = await gateway.create_session("policy")
        client = gateway.async_client(key)
        out = await client.chat.completions.create(
            model="policy", messages=[{"role": "user", "content": f"count to {i + 3}"}],
            max_tokens=12, temperature=temperature, top_p=top_p, extra_body={"top_k": top_k})
        assert out.choices
        got, _ = gateway.session(key).to_samples(reward=1.0, group=str(i))
        samples += got
    batch = collate(samples, pad_token_id=tokenizer.pad_token_id or 0)
    trainer = FSDPEngine(copy.deepcopy(model), lr=1e-5, token_budget=256)
    recomputed = await asyncio.to_thread(trainer.forward_logprobs, batch)
    mask = batch.loss_mask.bool()
    gap = float((recomputed[mask] - batch.old_logprobs[mask]).abs().max())
    assert gap < 1e-3, gap


async def test_weight_update_changes_greedy_output_and_bumps_the_version(engine, models):
    (model, tokenizer), (other, _) = models
    before, version = await _greedy(engine, PROMPT), engine.version
    expected = await _local_greedy(other, tokenizer, PROMPT)
    await engine.update_weights(WeightUpdate(named_tensors=iter(other.state_dict().items())))
    after = await _greedy(engine, PROMPT)
    assert engine.version == version + 1 and after.versions == [version + 1] * 12
    assert after.token_ids == expected.token_ids
    await engine.update_weights(WeightUpdate(named_tensors=iter(model.state_dict().items())))
    assert (await _greedy(engine, PROMPT)).token_ids == before.token_ids


async def test_requests_in_flight_wait_while_paused_and_survive_an_update(engine, models):
    (model, _), (other, _) = models
    version = engine.version
    sp = SamplingParams(max_tokens=300, temperature=0)
    tasks = [asyncio.create_task(engine.generate(GenerateRequest(PROMPT[: i + 2], sp)))
             for i in range(3)]
    await asyncio.sleep(0.5)
    await engine.pause()
    await asyncio.sleep(0.5)
    assert not any(t.done() for t in tasks)  # retracted to the queue, not failed
    await engine.update_weights(WeightUpdate(named_tensors=iter(other.state_dict().items())))
    assert engine.version == version + 1
    await engine.resume()
    for out in [(await t).outputs[0] for t in tasks]:
        assert out.finish_reason in ("length", "stop")
        assert out.versions == [version] * len(out.token_ids)  # sent before: the older one
    await engine.update_weights(WeightUpdate(named_tensors=iter(model.state_dict().items())))


async def test_streamed_tokens_leave_before_the_end_and_equal_generate(engine):
    """``generate_streaming`` on the real server (``"stream": true``): the first delta arrives
    while the request is held (paused, retracted) on the server; greedy deltas concatenate to
    what ``generate`` returns; a cancelled stream leaves the server serving."""
    sp = SamplingParams(max_tokens=200, temperature=0)
    deltas: list = []
    first = asyncio.Event()
    task = asyncio.create_task(engine.generate_streaming(
        GenerateRequest(PROMPT, sp), lambda d: (deltas.append(d), first.set())))
    try:
        await asyncio.wait_for(first.wait(), 120)
        await engine.pause()
        await asyncio.sleep(1.0)
        assert not task.done() and deltas  # its first tokens are here, the rest is held
    finally:
        await engine.resume()
    streamed = (await task).outputs[0]
    whole = (await engine.generate(GenerateRequest(PROMPT, sp))).outputs[0]
    assert streamed.token_ids == whole.token_ids
    assert [t for d in deltas for t in d.token_ids] == streamed.token_ids
    assert [x for d in deltas for x in d.logprobs] == streamed.logprobs
    assert len(deltas) >= 2
    cancelled = asyncio.create_task(engine.generate_streaming(
        GenerateRequest(PROMPT, SamplingParams(max_tokens=900, temperature=0)), lambda d: None))
    await asyncio.sleep(0.5)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    again = (await engine.generate(GenerateRequest(PROMPT, sp))).outputs[0]
    assert again.token_ids == whole.token_ids
