"""LocalEngine's prefix cache: a session's next turn reuses its history's keys/values, with the
same outputs as without the cache, and never across a weight update."""

from __future__ import annotations

import asyncio

import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.prefix_cache import PrefixCache
from areal_agents.models import tiny

USER = [3, 4, 5, 6, 7]  # the "next user message" appended after each completion


@pytest.fixture
def model_tok():
    torch.set_num_threads(1)
    return tiny("xs", seed=0)


def _kv(length: int) -> list[torch.Tensor]:
    return [torch.randn(1, 2, length, 4)]


async def _conversation(engine: LocalEngine, *, turns: int, temperature: float,
                        session: str | None = "s1", n: int = 1,
                        first: list[int] | None = None, user: list[int] = USER):
    """Per turn: (prompt length, outputs, prompt tokens computed, reused) of one session that
    re-sends its whole history each turn, then ``user``."""
    prompt, record = list(range(10, 60)) if first is None else first, []
    for turn in range(turns):
        before = (engine.prefill_counts.computed, engine.prefill_counts.reused)
        sp = SamplingParams(max_tokens=8, temperature=temperature, seed=7 + turn, n=n)
        result = await engine.generate(GenerateRequest(prompt, sp, session_id=session))
        record.append((len(prompt), result.outputs, engine.prefill_counts.computed - before[0],
                       engine.prefill_counts.reused - before[1]))
        prompt = prompt + result.outputs[0].token_ids + user
    return record


def _assert_same_outputs(cached, uncached) -> None:
    for (_, outs_c, _, _), (_, outs_u, _, _) in zip(cached, uncached, strict=True):
        for c, u in zip(outs_c, outs_u, strict=True):
            assert c.token_ids == u.token_ids and c.versions == u.versions
            assert c.finish_reason == u.finish_reason
            # reused keys/values differ from recomputed ones by float32 rounding only
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(u.logprobs),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])  # greedy and seeded sampling
async def test_turns_reuse_the_history_with_the_same_outputs(model_tok, temperature):
    model, tok = model_tok
    async with LocalEngine(model, tok, prefix_cache_tokens=0) as plain:
        uncached = await _conversation(plain, turns=3, temperature=temperature)
    async with LocalEngine(model, tok) as engine:
        cached = await _conversation(engine, turns=3, temperature=temperature)
    _assert_same_outputs(cached, uncached)
    assert [(r[2], r[3]) for r in uncached] == [(r[0], 0) for r in uncached]
    (len1, outs1, computed1, reused1), (len2, _, computed2, reused2) = cached[:2]
    assert (computed1, reused1) == (len1, 0)  # nothing cached before turn 1
    # turn 2 reuses turn 1's prompt and every completion token but the last (never fed)
    history = len1 + len(outs1[0].token_ids) - 1
    assert (computed2, reused2) == (len2 - history, history)
    assert computed2 == 1 + len(USER) < len2
    assert cached[2][3] > reused2  # turn 3 reuses turns 1 and 2


async def test_n_samples_share_the_cached_prefix(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok, prefix_cache_tokens=0) as plain:
        uncached = await _conversation(plain, turns=2, temperature=1.0, n=3)
    async with LocalEngine(model, tok) as engine:
        cached = await _conversation(engine, turns=2, temperature=1.0, n=3)
    _assert_same_outputs(cached, uncached)
    assert cached[1][3] > 0


async def test_interleaved_sessions_each_reuse_their_own_history(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok, prefix_cache_tokens=0) as plain:
        uncached = await asyncio.gather(
            *(_conversation(plain, turns=2, temperature=1.0, session=s) for s in "ab"))
    async with LocalEngine(model, tok) as engine:
        cached = await asyncio.gather(
            *(_conversation(engine, turns=2, temperature=1.0, session=s) for s in "ab"))
    for c, u in zip(cached, uncached, strict=True):
        _assert_same_outputs(c, u)
    # (the counts are the engine's: each session reused its own turn-1 history once)
    assert engine.prefill_counts.reused == sum(c[0][0] + len(c[0][1][0].token_ids) - 1
                                               for c in cached)


async def test_sessions_with_uneven_suffixes_prefill_together(model_tok, monkeypatch):
    """Turn 2 of three sessions joins one step with 2, 20 and 5 uncached tokens: the first two
    prefill together (the first recomputes 18 cached tokens), the third's whole prompt (14
    tokens) is shorter than 20, so it is prefilled from scratch."""
    model, tok = model_tok
    shapes = {"x": (list(range(10, 60)), [3]), "y": (list(range(20, 70)), list(range(100, 119))),
              "z": ([8, 9], [5, 6, 7, 4])}

    async def run(engine: LocalEngine):
        return await asyncio.gather(*(_conversation(engine, turns=2, temperature=1.0, session=s,
                                                    first=first, user=user)
                                      for s, (first, user) in shapes.items()))

    async with LocalEngine(model, tok, prefix_cache_tokens=0) as plain:
        uncached = await run(plain)
    plans = []
    plan = LocalEngine._plan_cached_prefills

    def spy(self, joining, version):
        groups, misses = plan(self, joining, version)
        plans.append(([[h.suffix for h in g] for g in groups], [len(j.request.prompt_ids)
                                                                for j in misses]))
        return groups, misses

    monkeypatch.setattr(LocalEngine, "_plan_cached_prefills", spy)
    async with LocalEngine(model, tok) as engine:
        cached = await run(engine)
    for c, u in zip(cached, uncached, strict=True):
        _assert_same_outputs(c, u)
    assert all(len(c[0][1][0].token_ids) == 8 for c in cached)  # no early EOS: shapes hold
    assert ([[2, 20]], [14]) in plans


async def test_requests_without_a_session_do_not_use_the_cache(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok) as engine:
        record = await _conversation(engine, turns=2, temperature=0.0, session=None)
    assert [r[3] for r in record] == [0, 0]


async def test_a_weight_update_drops_the_cache(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok) as engine:
        await _conversation(engine, turns=1, temperature=0.0)
        new_model, _ = tiny("xs", seed=1)
        await engine.update_weights(WeightUpdate(named_tensors=list(new_model.state_dict().items())))
        prompt = list(range(10, 70))
        await engine.generate(GenerateRequest(prompt, SamplingParams(max_tokens=4), session_id="s1"))
        assert engine.prefill_counts.reused == 0


async def test_a_completion_that_spans_an_update_is_not_cached(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok) as engine:
        prompt = list(range(10, 40))
        request = GenerateRequest(prompt, SamplingParams(max_tokens=60, temperature=0),
                                  session_id="s1")
        task = asyncio.ensure_future(engine.generate(request))
        for _ in range(2000):  # wait until decoding is under way
            if any(len(s.token_ids) >= 3 for s in engine._running):
                break
            await asyncio.sleep(0.002)
        same = list(model.state_dict().items())  # the same weights, version 1
        await engine.update_weights(WeightUpdate(named_tensors=same))
        out = (await task).outputs[0]
        assert out.versions[0] == 0 and out.versions[-1] == 1
        follow_up = prompt + out.token_ids + USER
        await engine.generate(GenerateRequest(follow_up, SamplingParams(max_tokens=2),
                                              session_id="s1"))
        assert engine.prefill_counts.reused == 0


def test_prefix_cache_reuses_the_longest_common_prefix():
    cache = PrefixCache(max_tokens=100)
    kv = _kv(5)
    cache.put("s", [1, 2, 3, 4, 5], kv, kv, version=2)
    assert cache.get("s", [1, 2, 3, 9, 9, 9], version=2)[0] == 3
    assert cache.get("s", [1, 2, 3, 4, 5, 6, 7], version=2)[0] == 5
    assert cache.get("s", [1, 2, 3, 4, 5], version=2)[0] == 4  # the last token is computed
    assert cache.get("s", [9, 2, 3], version=2) == (0, None)
    assert cache.get("s", [1], version=2) == (0, None)
    assert cache.get("s", [1, 2, 3], version=3) == (0, None)
    assert cache.get("t", [1, 2, 3], version=2) == (0, None)
    assert cache.get(None, [1, 2, 3], version=2) == (0, None)


def test_prefix_cache_keeps_one_entry_per_session_within_the_budget():
    cache = PrefixCache(max_tokens=10)
    cache.put("a", [1, 2, 3, 4], _kv(4), _kv(4), version=0)
    cache.put("a", [1, 2, 3, 4, 5, 6], _kv(6), _kv(6), version=0)  # replaces a's entry
    assert (len(cache), cache.num_tokens) == (1, 6)
    cache.put("b", [7, 8, 9], _kv(3), _kv(3), version=0)
    assert cache.get("a", [1, 2, 9], version=0)[0] == 2  # a is now the most recently used
    cache.put("c", [5, 5], _kv(2), _kv(2), version=0)  # 11 tokens: b (least recent) goes
    assert cache.get("b", [7, 8, 9, 1], version=0) == (0, None)
    assert (len(cache), cache.num_tokens) == (2, 8)
    cache.put("d", list(range(11)), _kv(11), _kv(11), version=0)  # alone over the budget
    assert cache.get("d", [0, 1, 2], version=0) == (0, None) and len(cache) == 2
    cache.clear()
    assert (len(cache), cache.num_tokens) == (0, 0)


def test_prefix_cache_budget_must_not_be_negative():
    with pytest.raises(ValueError, match=r"max_tokens must be >= 0 \(0 disables it\), got -1"):
        PrefixCache(max_tokens=-1)
