"""A PPO step on samples recorded by the gateway (official SDK, tiny model) lowers their loss."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

import areal_agents as aa
from areal_agents.algorithms import GRPO
from areal_agents.samples import collate


async def _record_sessions(gateway, temperature: float) -> list[aa.Sample]:
    """2 tasks x 4 two-turn conversations; reward = share of digits in the replies."""
    samples = []
    for task, question in enumerate(["add 2 and 3", "count to 4"]):
        for k in range(4):
            key = await gateway.create_session("policy")
            client = gateway.async_client(key)
            messages = [{"role": "user", "content": question}]
            replies = []
            for turn in range(2):
                out = await client.chat.completions.create(
                    model="policy", messages=messages, max_tokens=5,
                    temperature=temperature, seed=100 * task + 10 * k + turn)
                reply = out.choices[0].message.content or ""
                replies.append(reply)
                messages += [{"role": "assistant", "content": reply},
                             {"role": "user", "content": "again"}]
            text = "".join(replies)
            reward = sum(c.isdigit() for c in text) / max(len(text), 1) + 0.1 * k
            got, _report = gateway.session(key).to_samples(
                reward=reward, agent="player", group=f"task{task}")
            samples += got
    return samples


async def test_ppo_step_on_gateway_recorded_samples_lowers_loss():
    temperature = 0.8
    model, tokenizer = aa.models.tiny("xs", seed=3)
    trainer = aa.FSDPEngine(copy.deepcopy(model), lr=3e-3)
    engine = aa.LocalEngine(model, tokenizer)
    gateway = aa.Gateway()
    gateway.add_policy("policy", [engine], tokenizer)
    try:
        samples = await _record_sessions(gateway, temperature)
    finally:
        await engine.close()
    # two turns per session merged into one sample each (the tokenization contract)
    assert len(samples) == 8
    assert [s.meta["turns"] for s in samples] == [[0, 1]] * 8
    algo = GRPO()
    batch = algo.prepare(collate(samples, temperature=temperature), samples)
    prox = trainer.forward_logprobs(batch)
    mask = batch.loss_mask.bool()
    # behaviour log-probs recorded by the gateway equal the trainer's on the same ids
    torch.testing.assert_close(prox[mask], batch.old_logprobs[mask], atol=1e-4, rtol=1e-4)
    batch = replace(batch, prox_logprobs=prox)
    losses = [trainer.train_step(batch, algo.loss)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] - 1e-3, losses
