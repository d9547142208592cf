"""Format-only warm start: demos from env-random players, tokenized as the gateway does, fit
with SFTTrainer's loop."""

from __future__ import annotations

import pytest
import torch

from areal_agents.models import tiny
from areal_agents.registration import make
from areal_agents.samples import Sample
from areal_agents.trainers.fsdp.engine import FSDPEngine
from areal_agents.trainers.llm_session import raw_prompt
from areal_agents.trainers.warm_start import collect_demos, demo_samples, sft


class RecordingEngine:
    """Records the rows (first token id) of each batch; the loss is the step index."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def train_step(self, batch, loss_fn):
        self.batches.append(batch.input_ids[:, 0].tolist())
        loss, _ = loss_fn(torch.zeros(batch.input_ids.shape), torch.zeros(batch.input_ids.shape),
                          batch)
        assert torch.isclose(batch.loss_weights.sum(), torch.tensor(1.0))  # token-mean NLL
        return {"loss": float(len(self.batches)) + float(loss)}


def test_sft_runs_exact_steps_and_sees_every_demo_before_repeating():
    samples = [Sample([k, 1, 2], [0, 1, 1], [0.0] * 3, [-1] * 3) for k in range(10, 15)]
    engine = RecordingEngine()
    losses = sft(engine, samples, steps=4, batch_size=3, seed=0)
    assert losses == [1.0, 2.0, 3.0, 4.0]
    rows = [r for b in engine.batches for r in b]
    assert [len(b) for b in engine.batches] == [3, 3, 3, 3]
    assert sorted(rows[:5]) == [10, 11, 12, 13, 14] and sorted(rows[5:10]) == [10, 11, 12, 13, 14]
    assert sft(RecordingEngine(), samples, 4, 3, seed=0) == losses
    with pytest.raises(ValueError, match="no demonstrations"):
        sft(engine, [], 3)


async def test_random_demos_lower_the_nll_of_valid_actions():
    demos = await collect_demos(lambda: make("Signaling-v0", num_items=2, pool_size=2),
                                {"speaker": "random", "listener": "random"}, range(8))
    speaker = demos.transcripts["speaker"]
    assert len(speaker) == 8 and speaker[0][-1]["role"] == "assistant"
    assert (demos.num_episodes, demos.num_failed) == (8, 0)
    model, tokenizer = tiny("xs", seed=0)
    samples = demo_samples(tokenizer, demos.transcripts["speaker"], api="completions")
    prompt = tokenizer(raw_prompt(demos.transcripts["speaker"][0][:-1]))["input_ids"]
    assert samples[0].token_ids[: len(prompt)] == prompt  # the gateway's raw-text prompt
    assert sum(samples[0].loss_mask) >= 2  # the message and EOS are targets
    losses = sft(FSDPEngine(model, lr=3e-3), samples, steps=15, batch_size=8, seed=0)
    assert len(losses) == 15 and sum(losses[-3:]) / 3 < losses[0] - 1.0
