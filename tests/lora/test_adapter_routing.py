"""Two adapter policies of one base: each trains on exactly its own agent's samples, grouped by
(task, agent), at its own version; and seeded sampling does not depend on which adapter's rows
share the continuous batch (issue 21: why two adapters of one base did not learn Signaling)."""

from __future__ import annotations

import asyncio
import collections

import pytest
import torch

import areal_agents as aa
from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.models import tiny

from .test_local_adapters import TARGETS, adapter_tensors

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
SAMPLING = {"temperature": 1.0, "max_tokens": 1}


@pytest.mark.slow
async def test_each_adapter_policy_trains_on_its_own_agents_groups_at_its_version():
    torch.set_num_threads(1)
    adapter = {"adapter_of": "base", "lora": LORA, "lr": 1e-2, "api": "completions",
               "sampling": SAMPLING}
    policies = {"base": aa.Policy(model="tiny:xs", frozen=True, api="completions"),
                "speaker": aa.Policy(**adapter), "listener": aa.Policy(**adapter, seed=1)}
    trainer = aa.Trainer(env="Signaling-v0", env_kwargs={"num_items": 2, "vocab_size": 4},
                         policies=policies, policy_map={"speaker": "speaker",
                                                        "listener": "listener"},
                         batch_size=4, group_size=2, max_staleness=0, progress=False)
    seen: list[tuple[str, list]] = []
    returns: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    try:
        await trainer.setup()
        algorithm = trainer.algorithms["speaker"]
        assert trainer.algorithms["listener"] is algorithm  # one object: wrap it once
        prepare = algorithm.prepare

        def recording(batch, samples):
            seen.append((samples[0].policy, list(samples)))
            return prepare(batch, samples)

        algorithm.prepare = recording
        add_episode = trainer._stats.add_episode

        def record_returns(stats):
            for agent, ret in stats.returns.items():
                returns[(str(stats.seed), agent)].append(ret)
            return add_episode(stats)

        trainer._stats.add_episode = record_returns
        await trainer.afit(3)
    finally:
        await trainer.aclose()
    per_policy = collections.Counter(p for p, _ in seen)
    assert per_policy == {"speaker": 3, "listener": 3}
    step = {"speaker": 0, "listener": 0}
    for policy, samples in seen:
        # 4 episodes x one sample each (one-token replies), all the policy's own agent
        assert len(samples) == 4
        assert {(s.policy, s.agent) for s in samples} == {(policy, policy)}
        groups = collections.Counter((s.group, s.agent) for s in samples)
        assert sorted(groups.values()) == [2, 2]  # group_size episodes of one task, one role
        versions = {v for s in samples for v, m in zip(s.versions, s.loss_mask, strict=True)
                    if m}
        assert versions == {step[policy]}  # max_staleness 0: the adapter's current version
        for s in samples:  # the sample's reward is its own agent's return in that episode
            assert s.reward in returns[(s.group, policy)]
        step[policy] += 1


async def test_seeded_sampling_is_the_same_alone_and_mixed_with_the_other_adapter():
    torch.set_num_threads(1)
    model, tok = tiny("xs", seed=0)
    async with LocalEngine(model, tok) as engine:
        views = {}
        for i, name in enumerate(("speaker", "listener")):
            views[name] = engine.add_adapter(name, rank=4, alpha=8, target_modules=TARGETS)
            tensors = adapter_tensors(engine.model, 4, seed=10 + i)
            await views[name].update_weights(WeightUpdate(named_tensors=tensors.items()))
        jobs = []
        for k in range(12):
            name = ("speaker", "listener")[k % 2]
            sampling = SamplingParams(max_tokens=3, temperature=1.0, seed=1000 + k)
            jobs.append((name, GenerateRequest([1, 5 + k % 5, 9 + k % 3, 20], sampling)))
        alone = [(await views[n].generate(r)).outputs[0] for n, r in jobs]
        mixed = [r.outputs[0] for r in
                 await asyncio.gather(*(views[n].generate(r) for n, r in jobs))]
        other = {"speaker": "listener", "listener": "speaker"}
        swapped = [r.outputs[0] for r in
                   await asyncio.gather(*(views[other[n]].generate(r) for n, r in jobs))]
    for a, m in zip(alone, mixed, strict=True):
        assert m.token_ids == a.token_ids
        torch.testing.assert_close(torch.tensor(m.logprobs), torch.tensor(a.logprobs),
                                   rtol=0, atol=1e-4)
    # the adapters differ: the same seeded requests on the other adapter give other log-probs
    assert any(abs(x - y) > 1e-3 for a, s in zip(alone, swapped, strict=True)
               for x, y in zip(a.logprobs, s.logprobs, strict=False))
