"""LocalEngine: exact token ids/log-probs, sampling controls, continuous batching, lifecycle."""

from __future__ import annotations

import asyncio

import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.errors import ContextLengthExceeded, EngineError
from areal_agents.models import save_tiny, tiny


@pytest.fixture
def model_tok():
    torch.set_num_threads(1)
    return tiny("xs", seed=0)


@pytest.fixture
async def engine(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok, max_batch_size=8) as eng:
        yield eng


def _req(prompt: list[int], **kw) -> GenerateRequest:
    return GenerateRequest(list(prompt), SamplingParams(**kw))


def _forward_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """``[len(completion), vocab]`` temperature-1 log-probs at each completion position."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + len(completion)]


async def _wait_for_tokens(engine: LocalEngine, count: int) -> None:
    for _ in range(2000):
        if any(len(s.token_ids) >= count for s in engine._running):
            return
        await asyncio.sleep(0.002)
    raise AssertionError("generation did not progress")


async def test_greedy_matches_argmax_of_a_direct_forward(engine, model_tok):
    model, tok = model_tok
    prompt = tok.encode("12 + 30 = ? Answer:")
    out = (await engine.generate(_req(prompt, max_tokens=24, temperature=0))).outputs[0]
    assert len(out.token_ids) == len(out.logprobs) == len(out.versions) == 24
    assert out.finish_reason == "length" and out.versions == [0] * 24
    ref = _forward_logprobs(model, prompt, out.token_ids)
    assert out.token_ids == ref.argmax(-1).tolist()
    expected = ref.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


async def test_temperature_one_logprobs_match_a_direct_forward(engine, model_tok):
    model, tok = model_tok
    prompt = tok.encode("Guess a number:")
    res = await engine.generate(_req(prompt, max_tokens=30, temperature=1.0, seed=7, n=2))
    for out in res.outputs:
        ref = _forward_logprobs(model, prompt, out.token_ids)
        expected = ref.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


async def test_logprobs_follow_the_filtered_distribution(engine, model_tok):
    model, tok = model_tok
    prompt = tok.encode("move:")
    out = (await engine.generate(_req(prompt, max_tokens=20, temperature=0.7, top_k=5, seed=1,
                                      top_logprobs=3))).outputs[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0].float()
    logits = logits[len(prompt) - 1 : -1] / 0.7
    kth = logits.topk(5, dim=-1).values[:, -1:]
    filtered = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    expected = filtered.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    assert torch.isfinite(expected).all()  # every sampled token is in its top-5
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)
    assert out.top_logprobs is not None and len(out.top_logprobs) == 20
    assert all(len(alts) == 3 for alts in out.top_logprobs)
    first_ids = [i for i, _ in out.top_logprobs[0]]
    assert first_ids == filtered[0].topk(3).indices.tolist()


async def test_top_p_keeps_only_the_nucleus(engine, model_tok):
    model, tok = model_tok
    prompt = tok.encode("x")
    out = (await engine.generate(_req(prompt, max_tokens=30, temperature=1.0, top_p=0.05,
                                      seed=3))).outputs[0]
    ref = _forward_logprobs(model, prompt, out.token_ids)
    for pos, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        probs, order = ref[pos].exp().sort(descending=True)
        size = int(((probs.cumsum(0) - probs) < 0.05).sum())  # smallest prefix with mass >= p
        assert token in order[:size].tolist()
        expected = ref[pos, token].exp() / probs[:size].sum()
        assert lp == pytest.approx(float(expected.log()), abs=1e-4)
        assert size < 200  # the nucleus really is a small subset of the 1024 tokens


async def test_seeds_are_reproducible_whatever_the_batch(engine, model_tok):
    _, tok = model_tok
    prompt = tok.encode("Answer:")
    alone = await engine.generate(_req(prompt, max_tokens=20, seed=11, n=3))
    crowd = await asyncio.gather(
        engine.generate(_req(tok.encode("1 2 3 4 5 6"), max_tokens=30, seed=1)),
        engine.generate(_req(prompt, max_tokens=20, seed=11, n=3)),
        engine.generate(_req(tok.encode("higher"), max_tokens=5)),
    )
    assert [o.token_ids for o in crowd[1].outputs] == [o.token_ids for o in alone.outputs]
    assert len({tuple(o.token_ids) for o in alone.outputs}) == 3  # n samples differ
    other = await engine.generate(_req(prompt, max_tokens=20, seed=12))
    assert other.outputs[0].token_ids != alone.outputs[0].token_ids


async def test_stop_strings_and_stop_ids(engine, model_tok):
    _, tok = model_tok
    prompt = tok.encode("Answer: 1")
    free = (await engine.generate(_req(prompt, max_tokens=30, seed=5))).outputs[0]
    cut = 6
    stop_id = free.token_ids[cut]
    first = free.token_ids.index(stop_id)
    by_id = (await engine.generate(_req(prompt, max_tokens=30, seed=5,
                                        stop_token_ids=[stop_id]))).outputs[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: first + 1]
    text = tok.decode(free.token_ids[: cut + 1])
    stop = text[-3:] if len(text) >= 3 else text
    by_text = (await engine.generate(_req(prompt, max_tokens=30, seed=5, stop=[stop]))).outputs[0]
    assert by_text.finish_reason == "stop"
    assert stop in tok.decode(by_text.token_ids)
    assert stop not in tok.decode(by_text.token_ids[:-1])
    assert by_text.token_ids == free.token_ids[: len(by_text.token_ids)]


async def test_requests_joining_mid_run_match_running_alone(engine, model_tok):
    _, tok = model_tok
    prompts = [tok.encode(t) for t in ["1 + 1 =", "The board: X|O|.", "higher or lower? 50", "a"]]
    solo = [(await engine.generate(_req(p, max_tokens=12 + 5 * i, temperature=0))).outputs[0]
            for i, p in enumerate(prompts)]
    first = asyncio.ensure_future(engine.generate(_req(prompts[0], max_tokens=12, temperature=0)))
    long = asyncio.ensure_future(engine.generate(_req(prompts[3], max_tokens=27, temperature=0)))
    await _wait_for_tokens(engine, 4)
    rest = [asyncio.ensure_future(engine.generate(_req(prompts[i], max_tokens=12 + 5 * i,
                                                       temperature=0))) for i in (1, 2)]
    await asyncio.sleep(0)
    assert engine.num_pending >= 3 and not long.done()  # they join a running batch
    results = await asyncio.gather(first, *rest, long)
    got = [r.outputs[0].token_ids for r in results]
    assert got == [s.token_ids for s in solo]
    assert engine.num_pending == 0


async def test_pause_holds_requests_and_resume_finishes_them(engine, model_tok):
    _, tok = model_tok
    task = asyncio.ensure_future(engine.generate(_req(tok.encode("x"), max_tokens=60, seed=0)))
    await _wait_for_tokens(engine, 2)
    await engine.pause()
    await engine.pause()  # idempotent
    held = len(engine._running[0].token_ids)
    queued = asyncio.ensure_future(engine.generate(_req(tok.encode("y"), max_tokens=3)))
    await asyncio.sleep(0.05)
    assert len(engine._running[0].token_ids) == held and not task.done() and not queued.done()
    await engine.resume()
    await engine.resume()
    res, res2 = await asyncio.gather(task, queued)
    assert len(res.outputs[0].token_ids) == 60 and len(res2.outputs[0].token_ids) == 3


async def test_update_weights_mid_generation_records_both_versions(engine, model_tok):
    model, tok = model_tok
    new_model, _ = tiny("xs", seed=1)
    prompt = tok.encode("1 + 2 =")
    task = asyncio.ensure_future(engine.generate(_req(prompt, max_tokens=60, temperature=0)))
    await _wait_for_tokens(engine, 3)
    await engine.update_weights(WeightUpdate(named_tensors=list(new_model.state_dict().items())))
    out = (await task).outputs[0]
    assert engine.version == 1
    assert out.versions[0] == 0 and out.versions[-1] == 1
    assert out.versions == sorted(out.versions)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight,
                       new_model.model.layers[1].mlp.down_proj.weight)
    fresh = (await engine.generate(_req(prompt, max_tokens=10, temperature=0))).outputs[0]
    assert fresh.versions == [1] * 10
    ref = _forward_logprobs(new_model, prompt, fresh.token_ids)
    assert fresh.token_ids == ref.argmax(-1).tolist()


async def test_update_weights_from_a_safetensors_directory(engine, model_tok, tmp_path):
    model, _ = model_tok
    save_tiny(tmp_path / "ckpt", "xs", seed=2)
    await engine.update_weights(WeightUpdate(path=str(tmp_path / "ckpt"), version=7))
    assert engine.version == 7
    assert torch.equal(model.lm_head.weight, tiny("xs", seed=2)[0].lm_head.weight)
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        await engine.update_weights(WeightUpdate(path=str(tmp_path)))


async def test_update_weights_rejects_unknown_names_and_shapes(engine, model_tok):
    model, _ = model_tok
    before = model.model.norm.weight.clone()
    bad = [("model.norm.weight", torch.zeros_like(before)),
           ("model.layers.0.mlp.up_proj.wieght", torch.zeros(3))]
    with pytest.raises(KeyError, match=r"no tensor 'model\.layers\.0\.mlp\.up_proj\.wieght'.*did you mean"):
        await engine.update_weights(WeightUpdate(named_tensors=bad))
    assert torch.equal(model.model.norm.weight, before) and engine.version == 0  # nothing applied
    with pytest.raises(ValueError, match="shape"):
        await engine.update_weights(WeightUpdate(named_tensors=[("model.norm.weight", torch.zeros(3))]))


async def test_context_and_prompt_errors(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok, max_context=32) as eng:
        with pytest.raises(ContextLengthExceeded, match="exceeds the context window of 32"):
            await eng.generate(_req(list(range(5, 30)), max_tokens=10))
        with pytest.raises(EngineError, match="empty prompt"):
            await eng.generate(_req([], max_tokens=1))
        with pytest.raises(EngineError, match="outside the vocabulary"):
            await eng.generate(_req([5, 99999], max_tokens=1))
        ok = await eng.generate(_req(list(range(5, 27)), max_tokens=10, temperature=0))
        assert len(ok.outputs[0].token_ids) == 10


async def test_back_pressure_small_queue(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok, max_batch_size=2, max_queue=1) as eng:
        tasks = [asyncio.ensure_future(eng.generate(_req([10 + i], max_tokens=8, temperature=0)))
                 for i in range(7)]
        await asyncio.sleep(0)
        assert eng.num_pending <= 3  # batch of 2 + queue of 1; the rest wait for a slot
        results = await asyncio.gather(*tasks)
    assert [len(r.outputs[0].token_ids) for r in results] == [8] * 7


async def test_close_fails_pending_and_is_idempotent(model_tok):
    model, tok = model_tok
    eng = LocalEngine(model, tok)
    task = asyncio.ensure_future(eng.generate(_req([5, 6], max_tokens=500)))
    await _wait_for_tokens(eng, 1)
    await eng.close()
    await eng.close()
    with pytest.raises(EngineError, match="closed"):
        await task
    with pytest.raises(EngineError, match="closed"):
        await eng.generate(_req([5], max_tokens=2))


async def test_engine_from_a_spec_and_needs_a_tokenizer(model_tok):
    model, _ = model_tok
    with pytest.raises(ValueError, match="needs tokenizer="):
        LocalEngine(model)
    async with LocalEngine("tiny:xs:seed=0") as eng:
        out = (await eng.generate(_req([1, 2, 3], max_tokens=4, temperature=0))).outputs[0]
    ref = _forward_logprobs(model, [1, 2, 3], out.token_ids)
    assert out.token_ids == ref.argmax(-1).tolist()


async def test_eos_always_stops(engine, model_tok):
    _, tok = model_tok
    prompt = tok.encode("Answer:")
    free = (await engine.generate(_req(prompt, max_tokens=12, temperature=0))).outputs[0]
    engine.eos_token_id = free.token_ids[4]
    out = (await engine.generate(_req(prompt, max_tokens=12, temperature=0))).outputs[0]
    first = free.token_ids.index(free.token_ids[4])
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"


async def test_cancelled_requests_leave_the_batch(engine, model_tok):
    _, tok = model_tok
    task = asyncio.ensure_future(engine.generate(_req(tok.encode("x"), max_tokens=2000)))
    await _wait_for_tokens(engine, 2)
    task.cancel()
    for _ in range(500):
        if not engine._running:
            break
        await asyncio.sleep(0.002)
    assert engine._running == [] and engine.num_pending == 0
    out = (await engine.generate(_req([5, 6], max_tokens=3, temperature=0))).outputs[0]
    assert len(out.token_ids) == 3


async def test_more_samples_than_the_batch_size(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok, max_batch_size=2) as eng:
        res = await eng.generate(_req([7, 8, 9], max_tokens=5, n=5, seed=4))
    assert len(res.outputs) == 5 and all(len(o.token_ids) == 5 for o in res.outputs)


def test_sliding_window_models_are_refused():
    model, tok = tiny("xs", use_sliding_window=True, sliding_window=16)
    with pytest.raises(ValueError, match="full-attention models only"):
        LocalEngine(model, tok)


async def test_batched_prefill_of_unequal_prompts_is_exact(engine, model_tok):
    model, tok = model_tok
    prompts = [tok.encode(t) for t in ["a", "12 + 30 = ? Answer:", "X|O|X\nO|.|.\nMove:", "lower"]]
    results = await asyncio.gather(*[
        engine.generate(_req(p, max_tokens=15, temperature=1.0, seed=i, n=1 + i % 2))
        for i, p in enumerate(prompts)
    ])
    for prompt, res in zip(prompts, results, strict=True):
        for out in res.outputs:
            ref = _forward_logprobs(model, prompt, out.token_ids)
            expected = ref.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_greedy_matches_a_direct_forward():
    model, tok = tiny("xs", seed=0)
    async with LocalEngine(model, tok, device="cuda") as eng:
        prompts = [[1, 20, 30], [5, 6, 7, 8, 9]]
        results = await asyncio.gather(*[eng.generate(_req(p, max_tokens=8, temperature=0))
                                         for p in prompts])
        sampled = await eng.generate(_req(prompts[0], max_tokens=8, seed=1))
    model.cpu()
    for prompt, res in zip(prompts, results, strict=True):
        out = res.outputs[0]
        assert out.token_ids == _forward_logprobs(model, prompt, out.token_ids).argmax(-1).tolist()
    assert len(sampled.outputs[0].token_ids) == 8
