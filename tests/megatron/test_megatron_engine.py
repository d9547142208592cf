"""MegatronEngine on CPU (gloo): parity with transformers and FSDPEngine, export, checkpoints.

Needs megatron-core (skipped without it; the normal test environment never installs it).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_helpers import grpo_batch, grpo_loss, hf_model

from areal_agents.errors import ConfigError, TrainError
from areal_agents.trainers.logprobs import full_logprobs
from areal_agents.trainers.megatron import MegatronEngine
from areal_agents.trainers.megatron.convert import megatron_names
from areal_agents.trainers.microbatch import plan_microbatches


@pytest.mark.parametrize(("family", "tie"), [("qwen3", None), ("qwen3", False), ("qwen2", False),
                                             ("llama", False), ("llama", True),
                                             ("llama3", False)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers(family, tie, temperature):
    model = hf_model(family, tie=tie)
    batch = grpo_batch(model, temperature=temperature)
    engine = MegatronEngine(copy.deepcopy(model), token_budget=24)
    assert [n for n, _ in engine.named_shards()] == megatron_names(engine.spec)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    want, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask, temperature)
    got = engine.forward_logprobs(batch)
    assert got.shape == batch.input_ids.shape
    assert (got[batch.attention_mask.bool()][1:] != 0).any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama3"])
def test_rope_angles_match_transformers_at_long_positions(family):
    """Up to 2x the original context, where Llama-3 scaling changes most frequencies."""
    model = hf_model(family)
    engine = MegatronEngine(copy.deepcopy(model))
    from areal_agents.trainers.megatron.model import rotary_table  # after megatron's import
    positions = torch.arange(0, 16384, 7)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    angles = rotary_table(engine.model, 16384)[positions[0], 0, 0]
    torch.testing.assert_close(angles.cos(), cos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(angles.sin(), sin[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shard_size", [None, "200KB"])
def test_engine_from_checkpoint_directory_equals_engine_from_model(tmp_path, shard_size):
    from areal_agents.models import tiny_tokenizer

    model = hf_model("qwen3")
    model.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    tiny_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_size is not None)
    from_dir = MegatronEngine(str(tmp_path))
    from_model = MegatronEngine(copy.deepcopy(model))
    assert from_dir.tokenizer is not None and from_dir.tokenizer.eos_token == "<|im_end|>"
    assert from_model.tokenizer is None
    for (name, a), (_, b) in zip(from_dir.export_weights(), from_model.export_weights(), strict=True):
        assert torch.equal(a, b), name
    batch = grpo_batch(model)
    assert torch.equal(from_dir.forward_logprobs(batch), from_model.forward_logprobs(batch))


def test_train_step_equals_fsdp_and_lowers_loss():
    from areal_agents.trainers.fsdp import FSDPEngine

    model = hf_model("qwen3")
    batch = grpo_batch(model)
    mega = MegatronEngine(copy.deepcopy(model), lr=1e-3, token_budget=24)
    fsdp = FSDPEngine(copy.deepcopy(model), lr=1e-3, token_budget=24)
    losses = []
    for _ in range(3):
        got, want = mega.train_step(batch, grpo_loss), fsdp.train_step(batch, grpo_loss)
        assert got.keys() == want.keys()
        for key in ("loss", "pg_loss", "entropy", "clip_frac"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=2e-6), key
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert got["lr"] == want["lr"] and got["num_tokens"] == want["num_tokens"]
        losses.append(got["loss"])
    # one step lowers the loss on the batch (then the PPO clip flattens it: ratios left the
    # trust region, so later steps keep it constant)
    assert losses[1] < losses[0] - 1e-3 and losses[2] <= losses[1] + 1e-7, losses
    assert mega.step == 3
    exported, reference = dict(mega.export_weights()), dict(fsdp.export_weights())
    assert exported.keys() == reference.keys()
    # Adam divides each gradient by its own running scale, so an element whose gradient is
    # near zero turns the backends' different float summation orders into a visible part of
    # one lr-sized update (3 of 525,056 elements differ by up to 7e-5 on some CPUs): the
    # bulk must match to 2e-5 and no element may be off by a tenth of the learning rate.
    off = 0
    for name, w in reference.items():
        torch.testing.assert_close(exported[name], w, atol=1e-4, rtol=0, msg=name)
        off += int(((exported[name] - w).abs() > 2e-5).sum())
    assert off <= 1e-4 * sum(w.numel() for w in reference.values()), off
    torch.testing.assert_close(mega.forward_logprobs(batch), fsdp.forward_logprobs(batch),
                               atol=2e-5, rtol=0)


def test_activation_checkpointing_gives_the_same_step():
    model = hf_model("qwen3")
    batch = grpo_batch(model)
    plain = MegatronEngine(copy.deepcopy(model), lr=1e-3, token_budget=24)
    recomputed = MegatronEngine(copy.deepcopy(model), lr=1e-3, token_budget=24,
                                activation_checkpointing=True)
    calls = []
    layer = recomputed.model.decoder.layers[0]
    inner = layer.mlp.forward
    layer.mlp.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)
    got, want = recomputed.train_step(batch, grpo_loss), plain.train_step(batch, grpo_loss)
    micro_batches = len(plan_microbatches(batch.attention_mask.sum(-1).tolist(), 24))
    assert micro_batches > 1 and len(calls) == 2 * micro_batches  # each runs again in backward
    assert got == want
    for (name, a), (_, b) in zip(recomputed.export_weights(), plain.export_weights(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_nan_loss_is_refused():
    model = hf_model("qwen3")
    engine = MegatronEngine(copy.deepcopy(model), lr=1e-3)

    def nan_loss(logprobs, entropy, mb):
        return (logprobs * mb.loss_weights).sum() * float("nan"), {}

    with pytest.raises(TrainError, match="non-finite loss"):
        engine.train_step(grpo_batch(model), nan_loss)
    assert engine.step == 0


async def test_export_into_local_engine_gives_same_logprobs(tmp_path):
    from transformers import AutoModelForCausalLM

    from areal_agents.engines.base import GenerateRequest, SamplingParams, WeightUpdate
    from areal_agents.engines.local import LocalEngine
    from areal_agents.models import tiny
    from areal_agents.samples import Sample, collate

    model = hf_model("qwen3")
    _, tok = tiny("xs")
    trainer = MegatronEngine(copy.deepcopy(model), lr=1e-2)
    trainer.train_step(grpo_batch(model), grpo_loss)
    serving = hf_model("qwen3", seed=5)  # other weights until the push
    engine = LocalEngine(serving, tok)
    try:
        await engine.update_weights(WeightUpdate(named_tensors=trainer.export_weights(), version=1))
        prompt = tok("Guess 42: higher", add_special_tokens=False)["input_ids"]
        out = (await engine.generate(GenerateRequest(
            prompt, SamplingParams(max_tokens=8, temperature=0.8, seed=3)))).outputs[0]
    finally:
        await engine.close()
    assert set(out.versions) == {1}
    ids = prompt + out.token_ids
    batch = collate([Sample(ids, [0] * len(prompt) + [1] * len(out.token_ids),
                            [0.0] * len(ids), [0] * len(ids))], temperature=0.8)
    got = trainer.forward_logprobs(batch)[0, len(prompt):]
    torch.testing.assert_close(got, torch.tensor(out.logprobs), atol=2e-5, rtol=0)

    trainer.save_hf(str(tmp_path))  # a transformers-loadable checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    with torch.no_grad():
        logits = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    want, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask, 0.8)
    torch.testing.assert_close(trainer.forward_logprobs(batch), want, atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path):
    model = hf_model("qwen3")
    batch = grpo_batch(model)
    original = MegatronEngine(copy.deepcopy(model), lr=1e-3, warmup_steps=3, token_budget=24)
    original.train_step(batch, grpo_loss)
    original.version = 4
    original.save(str(tmp_path))
    resumed = MegatronEngine(copy.deepcopy(hf_model("qwen3", seed=9)), lr=1e-3, warmup_steps=3,
                             token_budget=24)
    resumed.load(str(tmp_path))
    assert (resumed.step, resumed.version) == (1, 4)
    for (name, a), (_, b) in zip(original.export_weights(), resumed.export_weights(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    # optimizer moments, LR schedule (warm-up) and step continue exactly
    got, want = resumed.train_step(batch, grpo_loss), original.train_step(batch, grpo_loss)
    assert got == want
    for (name, a), (_, b) in zip(original.export_weights(), resumed.export_weights(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_load_refuses_incomplete_checkpoint(tmp_path):
    engine = MegatronEngine(hf_model("qwen3"))
    with pytest.raises(TrainError, match="no complete checkpoint"):
        engine.load(str(tmp_path))


def test_unsupported_options_raise_config_errors():
    with pytest.raises(ConfigError, match="LoRA"):
        MegatronEngine(hf_model("qwen3"), lora={"r": 4})
    with pytest.raises(ConfigError, match="tensor parallel size 3 must divide"):
        MegatronEngine(hf_model("qwen3"), tensor_parallel=3)
    with pytest.raises(ConfigError, match="tensor_parallel=2 must divide the world size 1"):
        MegatronEngine(hf_model("qwen3"), tensor_parallel=2)
    with pytest.raises(ConfigError, match="cosine"):
        MegatronEngine(hf_model("qwen3"), lr_schedule="cosine")


def test_trainer_backend_table_resolves_megatron():
    from areal_agents.trainers.trainer import backend_factory

    assert backend_factory("megatron") is MegatronEngine
