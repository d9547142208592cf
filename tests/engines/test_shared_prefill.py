"""LocalEngine prefills a prompt once when several requests with that prompt join the batch in
the same step (a GRPO group's members are separate requests with one prompt): every request's
outputs are those it gets alone, and ``prefill_counts.shared`` counts the prompt tokens not
recomputed."""

from __future__ import annotations

import asyncio

import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.engines.local import LocalEngine, _same_prompts
from areal_agents.models import tiny

PROMPT = list(range(10, 40))
OTHER = list(range(50, 62))


@pytest.fixture
def model_tok():
    torch.set_num_threads(1)
    return tiny("xs", seed=0)


def _requests(temperature: float) -> list[GenerateRequest]:
    """Four requests with PROMPT (one asks for n=2), one with OTHER, distinct seeds."""
    def sp(seed: int, n: int = 1) -> SamplingParams:
        return SamplingParams(max_tokens=12, temperature=temperature, seed=seed, n=n)
    return [GenerateRequest(PROMPT, sp(1)), GenerateRequest(OTHER, sp(2)),
            GenerateRequest(PROMPT, sp(3)), GenerateRequest(PROMPT, sp(4, n=2)),
            GenerateRequest(PROMPT, sp(5))]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_same_prompt_requests_share_one_prefill_with_the_same_outputs(model_tok,
                                                                            temperature):
    model, tok = model_tok
    alone = []
    for request in _requests(temperature):
        async with LocalEngine(model, tok, prefix_cache_tokens=0) as engine:
            alone.append(await engine.generate(request))
    async with LocalEngine(model, tok, prefix_cache_tokens=0) as engine:
        together = await asyncio.gather(*(engine.generate(r) for r in _requests(temperature)))
        counts = engine.prefill_counts
    # one prefill of PROMPT and one of OTHER; the three other PROMPT requests copy its rows
    assert (counts.computed, counts.shared) == (len(PROMPT) + len(OTHER), 3 * len(PROMPT))
    for one, other in zip(alone, together, strict=True):
        assert len(one.outputs) == len(other.outputs)
        for a, b in zip(one.outputs, other.outputs, strict=True):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                       atol=1e-5, rtol=0)
    # different seeds on one shared prefill still sample different completions
    if temperature > 0:
        firsts = {tuple(r.outputs[0].token_ids) for i, r in enumerate(together) if i != 1}
        assert len(firsts) > 1


def test_same_prompts_keys_on_adapter_and_prompt():
    def job(prompt, adapter=None):
        request = GenerateRequest(prompt, SamplingParams(max_tokens=1), adapter=adapter)
        return type("Job", (), {"request": request})()
    jobs = [job([1, 2]), job([1, 2], "a"), job([1, 2]), job([1, 2, 3]), job([1, 2], "a")]
    assert [[jobs.index(j) for j in same] for same in _same_prompts(jobs)] == [
        [0, 2], [1, 4], [3]]
