"""Shared prompt heads (``LocalEngine(shared_head_tokens=)``): distinct prompts that begin with
the same instruction prefill it once; log-probs match a full prefill to float rounding, and
the trainer's recompute of the behaviour log-probs stays within its 1e-5."""

from __future__ import annotations

import asyncio
import contextlib
import copy

import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.prefix_cache import PrefillCounts
from areal_agents.engines.scheduler import prefill
from areal_agents.engines.shared_head import (
    HeadPlan,
    common_prefix,
    plan_heads,
    prefill_shared_heads,
)
from areal_agents.gateway import Gateway
from areal_agents.models import tiny
from areal_agents.samples import collate
from areal_agents.trainers.llm_session import complete_in_process

HEAD = list(range(100, 130))  # a 30-token instruction every prompt starts with
PROMPTS = [[*HEAD, 200 + p, 201, 202 + p] for p in range(8)]


@pytest.fixture
def model_tok():
    torch.set_num_threads(1)
    return tiny("xs", seed=0)


def test_plan_heads_groups_by_the_first_tokens_and_caps_the_head():
    other = [7] * 20 + [1]
    plans, plain = plan_heads([[*HEAD, 1], [*HEAD, 2, 3], other, HEAD[:5], [*HEAD, 4]],
                              min_tokens=16, budget=8192)
    assert plans == [HeadPlan(tuple(HEAD), [0, 1, 4], [29, 30, 29], 2)]
    assert plain == [2, 3]  # alone in its group; too short for any head
    # identical-but-one prompts: the head stops one short of the shortest prompt
    (plan,), _ = plan_heads([HEAD, [*HEAD, 5]], min_tokens=16, budget=8192)
    assert (len(plan.head), plan.reuse, plan.width) == (29, [28, 29], 2)


def test_plan_heads_splits_by_budget_and_leaves_too_short_members():
    prompts = [[*HEAD, p] for p in range(5)]
    plans, plain = plan_heads(prompts, min_tokens=16, budget=2 * 31)
    assert [p.members for p in plans] == [[0, 1], [2, 3], [4]] and plain == []
    assert {p.head for p in plans} == {tuple(HEAD)}
    long = HEAD + list(range(300, 340))  # 40 tokens after the head: the other cannot match
    plans, plain = plan_heads([[*HEAD, 1], long], min_tokens=16, budget=8192)
    assert (plans, plain) == ([], [0, 1])  # only one would take the head: no sharing
    assert common_prefix([[1, 2], [1, 3]]) == 1
    with pytest.raises(ValueError, match="min_tokens must be >= 1, got 0"):
        plan_heads(PROMPTS, min_tokens=0, budget=8192)


def test_prefill_shared_heads_joins_each_plan_and_leaves_the_rest(model_tok):
    model, _ = model_tok
    requests = [GenerateRequest([*HEAD, 1, 2], SamplingParams(n=1)),
                GenerateRequest([*HEAD, 1, 2], SamplingParams(n=2))]
    groups = [requests, [GenerateRequest([*HEAD, 3])], [GenerateRequest([7, 8, 9])]]
    counts, adapters_seen, joined = PrefillCounts(), [], []

    def rows(adapters):
        adapters_seen.append(adapters)
        return contextlib.nullcontext()

    done = prefill_shared_heads(model, torch.device("cpu"), groups, 16, 8192, counts, rows,
                                lambda members, prefilled: joined.append((members, prefilled)))
    assert done == {0, 1}  # [7, 8, 9] shares no head: left to the plain prefill
    assert adapters_seen == [[None], [None, None]]  # the head's one row, then both prompts
    # the 30-token head once, the 2-token rests; group 0's second request copies its prompt
    assert (counts.computed, counts.head, counts.shared) == (30 + 2 * 2, 30 + 29, 32)
    ((members, (_, _, positions, logits)),) = joined
    assert members == [0, 1]
    _, _, want_positions, want_logits = prefill(model, [[*HEAD, 1, 2], [*HEAD, 3]], [3, 1],
                                                torch.device("cpu"))
    assert positions.tolist() == want_positions.tolist() == [32, 32, 32, 31]
    assert float((logits - want_logits).abs().max()) < 1e-4  # float rounding of the head


async def _generate(engine: LocalEngine, temperature: float) -> list[tuple]:
    requests = [GenerateRequest(p, SamplingParams(max_tokens=6, temperature=temperature,
                                                  seed=s, n=4))
                for s, p in enumerate(PROMPTS)]
    results = await asyncio.gather(*(engine.generate(r) for r in requests))
    return [(o.token_ids, o.logprobs) for r in results for o in r.outputs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_the_head_is_prefilled_once_with_the_same_tokens(model_tok, temperature):
    model, tok = model_tok
    async with LocalEngine(model, tok) as plain:
        want = await _generate(plain, temperature)
        full = copy.copy(plain.prefill_counts)
    async with LocalEngine(model, tok, shared_head_tokens=16) as engine:
        got = await _generate(engine, temperature)
        shared = engine.prefill_counts
    assert (full.computed, full.head) == (8 * 33, 0)
    # the 30-token head once, then each prompt's last 3 tokens on top of it
    assert (shared.computed, shared.head, shared.reused) == (30 + 8 * 3, 8 * 30, 0)
    assert [t for t, _ in got] == [t for t, _ in want]
    gap = max(abs(a - b) for (_, la), (_, lb) in zip(got, want, strict=True)
              for a, b in zip(la, lb, strict=True))
    assert gap < 1e-4  # float rounding of the head's keys/values only


async def test_off_by_default_and_negative_refused(model_tok):
    model, tok = model_tok
    async with LocalEngine(model, tok) as engine:
        await _generate(engine, 0.0)
        assert engine.prefill_counts.head == 0
    with pytest.raises(ValueError, match="shared_head_tokens must be >= 0"):
        LocalEngine(model, tok, shared_head_tokens=-1)


async def test_behaviour_logprobs_equal_the_trainers_recompute(model_tok):
    from areal_agents.trainers.fsdp import FSDPEngine

    model, tok = model_tok
    engine = LocalEngine(copy.deepcopy(model), tok, shared_head_tokens=8)
    gateway = Gateway()
    gateway.add_policy("p", [engine], tok)
    instruction = "Compute the result. Reply 'Answer: <number>'.\n"
    keys = [await gateway.create_session("p") for _ in range(8)]
    await asyncio.gather(*(
        complete_in_process(gateway, key, {"model": "p", "prompt": f"{instruction}{i} + 3 = ?",
                                           "max_tokens": 8, "temperature": 1.0, "seed": i})
        for i, key in enumerate(keys)))
    assert engine.prefill_counts.head > 0  # the requests shared their instruction
    samples = [s for i, key in enumerate(keys)
               for s in gateway.session(key).to_samples(reward=1.0, group=str(i))[0]]
    await gateway.close()
    await engine.close()
    batch = collate(samples, pad_token_id=tok.pad_token_id or 0)
    trainer_side = FSDPEngine(copy.deepcopy(model), lr=1e-5, token_budget=256)
    mask = batch.loss_mask.bool()
    recomputed = trainer_side.forward_logprobs(batch)
    assert int(mask.sum()) >= 8
    assert float((recomputed[mask] - batch.old_logprobs[mask]).abs().max()) < 1e-5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"shared_head_tokens": -1}, "Policy.inference.shared_head_tokens must be an integer >= 0 "
                                 "(0: off), got -1"),
    ({"shared_head_tokens": 16, "kind": "vllm"}, "Policy.inference.shared_head_tokens is for "
     "kind='in_process' (a LocalEngine), not 'vllm'; remove it"),
])
def test_placement_refuses_bad_shared_head_tokens(kwargs, message):
    from areal_agents.errors import ConfigError
    from areal_agents.trainers.placement import InferencePlacement

    with pytest.raises(ConfigError) as info:
        InferencePlacement(**kwargs)
    assert str(info.value) == message


async def test_the_trainers_in_process_engine_takes_the_placements_setting():
    from areal_agents.trainers.policy import Policy
    from areal_agents.trainers.trainer import Trainer

    trainer = Trainer(env="Arithmetic-v0", policies={"p": Policy(
        model="tiny:xs", inference={"shared_head_tokens": 12})}, policy_map={"agent": "p"},
        batch_size=2, group_size=2, progress=False)
    try:
        await trainer.setup()
        (engine,) = trainer.gateway.policies["p"].router.engines
        assert engine.shared_head_tokens == 12
    finally:
        await trainer.aclose()
