"""LocalEngine runs several decode steps per worker-thread hop (``_steps``): the same tokens,
log-probs and versions as one step per hop, fewer hops, and a weight update or pause still
lands between two steps."""

from __future__ import annotations

import asyncio

import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines import local as local_mod
from areal_agents.engines.local import LocalEngine
from areal_agents.models import tiny


@pytest.fixture
def model_tok():
    torch.set_num_threads(1)
    return tiny("xs", seed=0)


async def _batch(engine: LocalEngine):
    """Seeded requests of mixed lengths and n, sent together."""
    requests = [GenerateRequest(list(range(10, 20 + 3 * i)),
                                SamplingParams(max_tokens=5 + 4 * i, temperature=1.0,
                                               seed=100 + i, n=1 + i % 2))
                for i in range(4)]
    results = await asyncio.gather(*(engine.generate(r) for r in requests))
    return [[(o.token_ids, o.logprobs, o.versions, o.finish_reason) for o in r.outputs]
            for r in results]


async def test_many_steps_per_hop_give_the_same_outputs_in_fewer_hops(model_tok, monkeypatch):
    model, tok = model_tok
    monkeypatch.setattr(local_mod, "MAX_STEPS_PER_HOP", 1)
    async with LocalEngine(model, tok) as engine:
        one_per_hop = await _batch(engine)
        hops_one = engine.hops
    monkeypatch.setattr(local_mod, "MAX_STEPS_PER_HOP", 64)
    async with LocalEngine(model, tok) as engine:
        many = await _batch(engine)
        hops_many = engine.hops
    assert many == one_per_hop  # bit-exact: the same steps, only fewer wake-ups
    longest = max(len(o[0]) for outs in many for o in outs)
    assert hops_one >= longest - 1  # one hop per step (prefill samples the first token)
    assert hops_many < hops_one // 2


async def test_a_weight_update_lands_between_two_steps_of_a_hop(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok) as engine:
        task = asyncio.create_task(engine.generate(
            GenerateRequest(list(range(10, 30)), SamplingParams(max_tokens=60, temperature=1.0,
                                                                seed=3))))
        while engine.hops == 0 and not engine._running:  # the first hop has begun
            await asyncio.sleep(0.001)
        same = list(model.state_dict().items())  # the same weights, version 1
        await engine.update_weights(WeightUpdate(named_tensors=same))
        out = (await task).outputs[0]
    assert len(out.token_ids) == 60
    assert out.versions[0] == 0 and out.versions[-1] == 1  # not all 60 tokens in one hop


async def test_pause_ends_the_hop(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok) as engine:
        task = asyncio.create_task(engine.generate(
            GenerateRequest(list(range(10, 30)), SamplingParams(max_tokens=60, seed=3))))
        while not engine._running:
            await asyncio.sleep(0.001)
        await engine.pause()
        held = len(engine._running[0].token_ids)
        await asyncio.sleep(0.05)
        assert len(engine._running[0].token_ids) == held < 60 and not task.done()
        await engine.resume()
        assert len((await task).outputs[0].token_ids) == 60


async def test_jobs_waiting_for_a_full_batch_do_not_end_the_hop(model_tok, monkeypatch):
    """With every row taken, a waiting job could not join, so the hop goes on: the same
    outputs as one step per hop, and about one hop per request instead of one per step."""
    model, tok = model_tok
    requests = [GenerateRequest(list(range(10, 20 + i)),
                                SamplingParams(max_tokens=30, temperature=1.0, seed=7 + i))
                for i in range(4)]

    async def serve() -> tuple[list, int]:
        async with LocalEngine(model, tok, max_batch_size=1) as engine:
            results = await asyncio.gather(*(engine.generate(r) for r in requests))
            return [(o.token_ids, o.logprobs, o.versions) for r in results
                    for o in r.outputs], engine.hops

    monkeypatch.setattr(local_mod, "MAX_STEPS_PER_HOP", 1)
    one_per_hop, hops_one = await serve()
    monkeypatch.setattr(local_mod, "MAX_STEPS_PER_HOP", 64)
    many, hops_many = await serve()
    assert many == one_per_hop and all(len(o[0]) == 30 for o in many)
    assert hops_one >= 4 * 29
    assert hops_many <= 2 * len(requests)  # one step per hop while jobs waited: >= 3 * 29
