"""A GRPO step on samples recorded from a LocalEngine (tiny model) lowers the loss on them."""

from __future__ import annotations

from dataclasses import replace

import torch

from areal_agents.algorithms import GRPO
from areal_agents.engines.base import GenerateRequest, SamplingParams
from areal_agents.engines.local import LocalEngine
from areal_agents.samples import Sample, collate
from areal_agents.trainers.weight_sync import push_local

from ._helpers import make_engine, make_model


class _Tokenizer:
    eos_token_id = -1

    def decode(self, ids, skip_special_tokens=False):
        return ""


async def _record(engine, temperature: float) -> list[Sample]:
    """4 prompts x 4 completions; reward = share of even token ids generated."""
    samples = []
    for p, prompt in enumerate([[3, 8, 11], [20, 21], [5, 5, 9, 40], [33]]):
        for k in range(4):
            out = (await engine.generate(GenerateRequest(prompt, SamplingParams(
                max_tokens=6, temperature=temperature, seed=10 * p + k)))).outputs[0]
            n = len(prompt)
            reward = sum(t % 2 == 0 for t in out.token_ids) / len(out.token_ids)
            samples.append(Sample(prompt + out.token_ids, [0] * n + [1] * len(out.token_ids),
                                  [0.0] * n + out.logprobs, [-1] * n + out.versions,
                                  reward=reward, agent="player", group=f"task{p}"))
    return samples


async def test_grpo_step_on_recorded_samples_lowers_loss():
    temperature = 0.7
    trainer = make_engine(lr=3e-3)
    engine = LocalEngine(make_model(seed=77), _Tokenizer())
    await push_local(engine, trainer.export_weights(), version=0)
    samples = await _record(engine, temperature)
    await engine.close()
    algo = GRPO()
    batch = algo.prepare(collate(samples, temperature=temperature), samples)
    prox = trainer.forward_logprobs(batch)
    mask = batch.loss_mask.bool()
    # behaviour (engine) and proximal (trainer) log-probs are on one scale: same weights
    torch.testing.assert_close(prox[mask], batch.old_logprobs[mask], atol=2e-5, rtol=1e-5)
    batch = replace(batch, prox_logprobs=prox)
    losses = [trainer.train_step(batch, algo.loss)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] - 1e-3, losses
    # the policy moved towards high-reward completions: their log-probs went up on average
    after = trainer.forward_logprobs(batch)
    gain = ((after - prox) * batch.loss_mask).sum(-1) / batch.loss_mask.sum(-1)
    adv = (batch.advantages * batch.loss_mask).sum(-1) / batch.loss_mask.sum(-1)
    assert gain[adv > 0].mean() > gain[adv < 0].mean()
