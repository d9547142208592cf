"""The proximal recompute is skipped exactly for on-policy batches of exact (float32) engines."""

from __future__ import annotations

import pytest
import torch

from areal_agents.agents import ScriptedAgent
from areal_agents.engines.base import InferenceEngine
from areal_agents.engines.local import LocalEngine
from areal_agents.samples import Sample, SamplingDistribution, collate
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.proximal import (
    behaviour_is_proximal,
    exact_behaviour,
    proximal_logprobs,
    train_forward_float32,
)
from areal_agents.trainers.trainer import Trainer

T1 = SamplingDistribution(1.0)


def _sample(versions: list[int], sampling: SamplingDistribution | None = T1) -> Sample:
    mask = [0] + [1] * len(versions)
    return Sample([5, 6, 7, 8][: len(mask)], mask, [0.0] + [-0.25] * len(versions),
                  [-1, *versions], sampling=sampling)


class _TrainEngine:
    """Counts ``forward_logprobs`` calls; returns a recognisable tensor."""

    def __init__(self, version: int, mixed_precision: str = "fp32",
                 dtype: torch.dtype = torch.float32) -> None:
        self.version, self.mixed_precision, self.calls = version, mixed_precision, 0
        self.model = torch.nn.Linear(2, 2).to(dtype)
        self.shapes: list[tuple[int, ...]] = []

    def forward_logprobs(self, batch):
        self.calls += 1
        self.shapes.append(tuple(batch.input_ids.shape))
        return torch.full(batch.input_ids.shape, -9.0)


class _Exact(InferenceEngine):
    exact_logprobs = True


def test_on_policy_batch_reuses_the_behaviour_logprobs_bit_for_bit():
    samples = [_sample([3, 3]), _sample([3, 3, 3])]
    batch, engine = collate(samples), _TrainEngine(version=3)
    prox, skipped = proximal_logprobs(batch, samples, engine, exact=True)
    assert skipped == 1.0 and engine.calls == 0
    assert torch.equal(prox, batch.old_logprobs) and prox is not batch.old_logprobs


@pytest.mark.parametrize(("samples", "exact"), [
    ([_sample([2, 3])], True),                    # one token of the previous version
    ([_sample([2, 2]), _sample([3, 2])], True),   # every row has a stale token
    ([_sample([3, 3], sampling=None)], True),     # no recorded log-prob definition
    ([_sample([3, 3]), _sample([3, 3])], False),  # inexact engines: every row
])
def test_off_policy_or_inexact_batches_recompute(samples, exact):
    engine = _TrainEngine(version=3)
    batch = collate(samples)
    prox, skipped = proximal_logprobs(batch, samples, engine, exact=exact)
    assert skipped == 0.0 and engine.calls == 1
    assert engine.shapes == [tuple(batch.input_ids.shape)]  # the whole batch, one call
    assert torch.equal(prox, torch.full(batch.input_ids.shape, -9.0))


def test_only_the_rows_with_a_stale_token_are_recomputed():
    # rows 0 and 2 were generated entirely at version 3; row 1 has one token of version 2
    samples = [_sample([3, 3]), _sample([3, 2]), _sample([3, 3, 3])]
    batch, engine = collate(samples), _TrainEngine(version=3)  # [3, 4]: row 1 is 3 long
    prox, skipped = proximal_logprobs(batch, samples, engine, exact=True)
    assert engine.calls == 1 and engine.shapes == [(1, 3)]  # row 1 alone, padding trimmed
    assert skipped == pytest.approx(2 / 3)
    assert torch.equal(prox[[0, 2]], batch.old_logprobs[[0, 2]])  # behaviour, bit for bit
    assert prox[1].tolist() == [-9.0, -9.0, -9.0, 0.0]  # recomputed; padding as a full pass


def test_prompt_token_versions_do_not_count():
    assert behaviour_is_proximal([_sample([7])], 7, exact=True)  # prompt version -1 ignored


def test_exactness_needs_float32_on_both_sides():
    assert train_forward_float32(_TrainEngine(0))
    assert not train_forward_float32(_TrainEngine(0, mixed_precision="bf16"))
    assert not train_forward_float32(_TrainEngine(0, dtype=torch.bfloat16))
    assert not train_forward_float32(object())  # model elsewhere (worker group): unknown
    assert exact_behaviour([_Exact(), _Exact()], _TrainEngine(0))
    assert not exact_behaviour([_Exact(), InferenceEngine()], _TrainEngine(0))
    assert not exact_behaviour([], _TrainEngine(0))
    assert not exact_behaviour([_Exact()], _TrainEngine(0, mixed_precision="bf16"))


def test_local_engine_declares_exact_logprobs_in_float32_only():
    assert LocalEngine("tiny").exact_logprobs
    assert not LocalEngine("tiny", dtype=torch.bfloat16).exact_logprobs
    assert not InferenceEngine().exact_logprobs  # unknown servers


def _text_reward(episode) -> dict[str, float]:
    """A reward that differs between group members (the env's does not depend on the speaker
    here), so the advantages, the loss and the gradients are not zero."""
    said = "".join(m.get("content") or "" for m in episode.messages["speaker"]
                   if m["role"] == "assistant")
    return {"speaker": float(sum(map(ord, said)) % 7)}


def _trainer() -> Trainer:
    return Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(backend="fsdp", lr=1e-2,
                                    sampling={"temperature": 1.0, "max_tokens": 2})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(lambda obs: "A")},
        reward_fns=[_text_reward], batch_size=4, group_size=2, max_staleness=0,
        progress=False, generation_batch_size=1)


async def _losses(*, exact: bool, steps: int = 3) -> tuple[list[float], list[float]]:
    """Per step: (loss, grad_norm) flattened, and ``prox_recompute_skipped``."""
    trainer = _trainer()
    try:
        await trainer.setup()
        served = trainer.gateway.policies["speaker"].router.engines[0]
        assert served.exact_logprobs
        served.exact_logprobs = exact  # False: as a bf16 or unknown engine would declare
        history = await trainer.afit(steps)
    finally:
        await trainer.aclose()
    return ([h[f"policy/speaker/{k}"] for h in history for k in ("loss", "grad_norm")],
            [h["policy/speaker/prox_recompute_skipped"] for h in history])


@pytest.mark.slow  # two 3-step runs of a tiny model
async def test_sync_run_skips_the_recompute_with_the_same_losses():
    skip_losses, skipped = await _losses(exact=True)
    recompute_losses, recomputed = await _losses(exact=False)
    assert skipped == [1.0, 1.0, 1.0]
    assert recomputed == [0.0, 0.0, 0.0]  # an inexact engine always recomputes
    assert skip_losses == pytest.approx(recompute_losses, abs=1e-5)
    assert all(abs(x) > 1e-4 for x in skip_losses[1::2])  # gradients flowed: not vacuous
