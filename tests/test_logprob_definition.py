"""One log-prob definition from the engine to every trainer.

Tokens are sampled by the real ``LocalEngine`` behind the ``Gateway`` (temperature, top-k,
top-p per request), recorded in sessions, turned into samples and collated exactly as the
trainer does (``collate(samples, pad_token_id=pad)``); the FSDP and Archon engines holding the
same weights must recompute every generated token's log-prob within 1e-5 (importance ratio 1).
"""

from __future__ import annotations

import copy

import pytest
import torch

from areal_agents.engines.local import LocalEngine
from areal_agents.gateway import Gateway, Turn, turns_to_samples
from areal_agents.models import tiny
from areal_agents.samples import Sample, SamplingDistribution, TokenBatch, collate

# (temperature, top_k, top_p) of each recorded conversation; 0 = greedy
COMBOS = [(t, k, p) for t in (0.5, 1.0, 1.3) for k, p in ((0, 1.0), (0, 0.9), (5, 1.0), (5, 0.9))]
COMBOS.append((0.0, 0, 1.0))


async def _record(model, tokenizer) -> list[Sample]:
    """One two-turn chat per combo (both turns with the combo's params), via the SDK."""
    engine = LocalEngine(model, tokenizer)
    gateway = Gateway()
    gateway.add_policy("policy", [engine], tokenizer)
    samples: list[Sample] = []
    try:
        for i, (temperature, top_k, top_p) in enumerate(COMBOS):
            key = await gateway.create_session("policy")
            client = gateway.async_client(key)
            messages = [{"role": "user", "content": f"count to {i + 3}"}]
            for turn in range(2):
                out = await client.chat.completions.create(
                    model="policy", messages=messages, max_tokens=12, seed=10 * i + turn,
                    temperature=temperature, top_p=top_p, extra_body={"top_k": top_k})
                messages += [{"role": "assistant", "content": out.choices[0].message.content},
                             {"role": "user", "content": "more"}]
            got, report = gateway.session(key).to_samples(reward=1.0, group=str(i))
            assert report.num_splits == 0 and len(got) == 1
            samples += got
    finally:
        await engine.close()
    return samples


@pytest.fixture(scope="module")
def recorded():
    import asyncio

    model, tokenizer = tiny("xs", seed=5)
    samples = asyncio.run(_record(copy.deepcopy(model), tokenizer))
    batch = collate(samples, pad_token_id=tokenizer.pad_token_id or 0)  # as Trainer does
    return model, samples, batch


def _max_gap(recomputed: torch.Tensor, batch: TokenBatch) -> float:
    mask = batch.loss_mask.bool()
    assert int(mask.sum()) > 100  # enough generated tokens to mean something
    return float((recomputed[mask] - batch.old_logprobs[mask]).abs().max())


def test_samples_carry_each_requests_sampling_params(recorded):
    _, samples, batch = recorded
    assert [s.sampling for s in samples] == [SamplingDistribution(*c) for c in COMBOS]
    assert batch.temperature.tolist() == pytest.approx([c[0] for c in COMBOS])
    assert batch.top_k.tolist() == [c[1] for c in COMBOS]
    assert batch.top_p.tolist() == pytest.approx([c[2] for c in COMBOS])
    # both turns of every conversation merged into one sample (same params)
    assert all(s.meta["turns"] == [0, 1] and s.num_generated > 2 for s in samples)


def test_fsdp_recomputes_behaviour_logprobs_exactly(recorded):
    from areal_agents.trainers.fsdp import FSDPEngine

    model, _, batch = recorded
    engine = FSDPEngine(copy.deepcopy(model), lr=1e-5, token_budget=256)
    assert _max_gap(engine.forward_logprobs(batch), batch) < 1e-5
    # the old definition (temperature 1, no filtering -- what the trainer used to collate)
    # and AReaL's (temperature only) are far off on the same tokens
    plain = TokenBatch(**{**batch.__dict__, "temperature": None, "top_k": None, "top_p": None})
    assert _max_gap(engine.forward_logprobs(plain), batch) > 0.1
    temp_only = TokenBatch(**{**batch.__dict__, "top_k": None, "top_p": None})
    assert _max_gap(engine.forward_logprobs(temp_only), batch) > 0.05


def test_archon_recomputes_behaviour_logprobs_exactly(recorded):
    from areal_agents.trainers.archon import ArchonEngine

    model, _, batch = recorded
    engine = ArchonEngine(copy.deepcopy(model), token_budget=256)
    assert _max_gap(engine.forward_logprobs(batch), batch) < 1e-5


def test_training_forward_gives_ratio_one(recorded):
    """``train_step``'s forward (the loss function's log-probs) uses the same definition."""
    from areal_agents.trainers.fsdp import FSDPEngine

    model, _, batch = recorded
    engine = FSDPEngine(copy.deepcopy(model), lr=0.0, token_budget=256)
    seen: list[float] = []

    def loss_fn(logprobs, entropy, mb):
        mask = mb.loss_mask.bool()
        seen.append(float((logprobs.detach() - mb.old_logprobs)[mask].abs().max()))
        assert torch.isfinite(entropy).all()
        return (logprobs * mb.loss_mask).sum() * 0.0, {}

    engine.train_step(batch, loss_fn)
    assert seen and max(seen) < 1e-5


def _turn(prompt: list[int], completion: list[int], sampling: SamplingDistribution) -> Turn:
    return Turn(prompt, completion, [-0.5] * len(completion), [0] * len(completion), None, None,
                None, "stop", "r", sampling=sampling)


def test_turns_with_other_sampling_params_split():
    hot, cold = SamplingDistribution(1.3, 5, 0.9), SamplingDistribution(0.5)
    turns = [_turn([1, 2], [3, 4], hot), _turn([1, 2, 3, 4, 5], [6], hot),
             _turn([1, 2, 3, 4, 5, 6, 7], [8, 9], cold)]
    samples, report = turns_to_samples(turns)
    assert [s.meta["turns"] for s in samples] == [[0, 1], [2]]
    assert [s.sampling for s in samples] == [hot, cold]
    assert samples[1].token_ids == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert samples[1].loss_mask == [0] * 7 + [1, 1]
    (split,) = report.splits
    assert (split.turn, split.against, split.position) == (2, 0, 6)
    assert split.reason.startswith("sampling params differ from the sequence it extends")
    # same params merge (greedy ignores top-k/top-p, so they compare equal)
    greedy = [_turn([1], [2], SamplingDistribution(0.0, 5, 0.9)),
              _turn([1, 2, 3], [4], SamplingDistribution(0.0))]
    merged, report = turns_to_samples(greedy)
    assert len(merged) == 1 and report.num_splits == 0


def test_turn_sampling_survives_session_round_trip():
    from areal_agents.gateway import Session

    session = Session(policy="p")
    session.record(_turn([1, 2], [3], SamplingDistribution(0.7, 3, 0.8)))
    again = Session.from_dict(session.to_dict())
    assert again.turns[0].sampling == SamplingDistribution(0.7, 3, 0.8)
    (sample,), _ = again.to_samples()
    assert sample.sampling == SamplingDistribution(0.7, 3, 0.8)


def test_collate_temperature_argument():
    plain = Sample([1, 2, 3], [0, 1, 1], [0.0, -1.0, -1.0], [-1, 0, 0])
    rec = Sample([1, 2], [0, 1], [0.0, -1.0], [-1, 0], sampling=SamplingDistribution(0.7, 5))
    batch = collate([plain, rec])
    assert batch.temperature.tolist() == pytest.approx([1.0, 0.7])
    assert batch.top_k.tolist() == [0, 5] and batch.top_p.tolist() == [1.0, 1.0]
    assert collate([plain, rec], temperature=0.7).temperature.tolist() == pytest.approx([0.7, 0.7])
    mb = collate([plain, rec]).select([1])
    assert mb.temperature.tolist() == pytest.approx([0.7]) and mb.top_k.tolist() == [5]
    with pytest.raises(ValueError, match=r"collate\(temperature=1.3\) but sample 1 was sampled "
                                         r"at temperature 0.7; drop the temperature argument"):
        collate([plain, rec], temperature=1.3)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
])
def test_sampling_distribution_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingDistribution(**kwargs)


def archon_filtered_run(engine_kwargs: dict) -> dict:
    """Worker: one Archon step and the log-probs after it on a batch whose rows use per-row
    temperature/top-k/top-p (module level so spawned ranks can unpickle it)."""
    from archon.archon_helpers import TINY_ARGS, make_batch, pg_loss

    from areal_agents.trainers.archon import ArchonEngine, ModelArgs

    engine = ArchonEngine(ModelArgs(**{**TINY_ARGS, "n_layers": 4}), lr=1e-2, eps=1e-6, seed=0,
                          **engine_kwargs)
    batch = make_batch(vocab=TINY_ARGS["vocab_size"], lengths=(12, 9, 16, 5, 7, 14))
    batch.temperature = torch.tensor([0.5, 1.3, 0.0, 1.0, 0.7, 1.3])
    batch.top_k = torch.tensor([5, 0, 3, 0, 8, 5])
    batch.top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.8, 0.9])
    before = engine.forward_logprobs(batch)
    stats = engine.train_step(batch, pg_loss)
    return {"before": before, "loss": stats["loss"], "after": engine.forward_logprobs(batch)}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kwargs", [{"pp": 2, "pp_schedule": "1F1B"}, {"tp": 2}],
                         ids=["pp2", "tp2"])
def test_archon_parallel_forward_uses_per_row_sampling(tmp_path, kwargs):
    """Pipeline stages (the last stage's head) and tensor parallelism see the same per-row
    sampling params as one process: equal log-probs and loss."""
    from archon.archon_helpers import run_distributed

    single = archon_filtered_run({})
    ranks = run_distributed(archon_filtered_run, 2, str(tmp_path), engine_kwargs=kwargs)
    for got in ranks:
        assert (got["before"] - single["before"]).abs().max() < 1e-5
        assert got["loss"] == pytest.approx(single["loss"], abs=2e-5)
        assert (got["after"] - single["after"]).abs().max() < 2e-4
