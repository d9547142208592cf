"""FSDPEngine in one process: PPO step lowers the loss, LoRA, LR schedule, export -> LocalEngine."""

from __future__ import annotations

import math

import pytest
import torch

from areal_agents.engines.base import GenerateRequest, SamplingParams
from areal_agents.engines.local import LocalEngine
from areal_agents.errors import ConfigError, TrainError
from areal_agents.samples import Sample, collate
from areal_agents.trainers.fsdp import FSDPEngine
from areal_agents.trainers.logprobs import full_logprobs
from areal_agents.trainers.weight_sync import push_local

from ._helpers import make_batch, make_engine, make_model, ppo_loss


def test_forward_logprobs_equals_full_softmax_reference():
    engine = make_engine(token_budget=16)
    batch = make_batch(temperature=0.7)
    model = make_model()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    want, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask, 0.7)
    torch.testing.assert_close(engine.forward_logprobs(batch), want, atol=1e-5, rtol=1e-5)


def test_train_step_lowers_ppo_loss_and_reports_stats():
    engine = make_engine(token_budget=24)
    batch = make_batch()
    first = engine.train_step(batch, ppo_loss)
    assert set(first) >= {"loss", "grad_norm", "lr", "entropy", "num_tokens"}
    assert first["lr"] == pytest.approx(1e-3) and first["num_tokens"] == batch.num_tokens
    assert first["grad_norm"] > 0 and engine.step == 1
    later = [engine.train_step(batch, ppo_loss)["loss"] for _ in range(4)]
    assert later[-1] < first["loss"] - 1e-3


def test_microbatching_does_not_change_the_step():
    batch = make_batch()
    small, big = make_engine(token_budget=12), make_engine(token_budget=10_000)
    s, b = small.train_step(batch, ppo_loss), big.train_step(batch, ppo_loss)
    assert s["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert s["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for (n1, w1), (n2, w2) in zip(small.export_weights(), big.export_weights(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(w1, w2, atol=1e-5, rtol=1e-5)  # Adam amplifies ~1e-7


def test_gradient_checkpointing_gives_same_step():
    batch = make_batch()
    plain, ckpt = make_engine(), make_engine(gradient_checkpointing=True)
    assert ckpt.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    assert plain.train_step(batch, ppo_loss)["grad_norm"] == pytest.approx(
        ckpt.train_step(batch, ppo_loss)["grad_norm"], rel=1e-5)


def test_grad_clipping_limits_the_norm_the_optimizer_sees():
    engine = make_engine(max_grad_norm=1e-4)
    seen = []

    def spy(optimizer, args, kwargs):
        grads = [p.grad for p in engine.trainable_parameters().values() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    engine.optimizer.register_step_pre_hook(spy)
    stats = engine.train_step(make_batch(), ppo_loss)
    assert stats["grad_norm"] > 1e-3  # the reported norm is the pre-clip one
    assert seen == [pytest.approx(1e-4, rel=1e-3)]


def test_lora_trains_only_adapters_and_merges_on_export():
    engine = make_engine(lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, lr=1e-2)
    trainable = engine.trainable_parameters()
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in engine.module.named_parameters() if "lora_" not in n}
    merged_before = dict(engine.export_weights())
    batch = make_batch()
    losses = [engine.train_step(batch, ppo_loss)["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]
    for n, p in engine.module.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    merged = dict(engine.export_weights())
    assert merged.keys() == merged_before.keys() == {n for n, _ in make_engine().export_weights()}
    changed = {n for n in merged if not torch.equal(merged[n], merged_before[n])}
    assert changed and all(".q_proj." in n or ".v_proj." in n for n in changed)
    adapter = dict(engine.export_weights(merge_lora=False))
    assert adapter and all(n.startswith("base_model.model.") and ".lora_" in n for n in adapter)
    assert not any(".default." in n for n in adapter)
    # the merged export reproduces the LoRA model's log-probs in a plain model
    plain = make_model()
    plain.load_state_dict(merged, strict=False)
    with torch.no_grad():
        logits = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    want, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(engine.forward_logprobs(batch), want, atol=1e-5, rtol=1e-5)


def test_warmup_then_cosine_schedule():
    engine = make_engine(lr=1.0, warmup_steps=2, lr_schedule="cosine", total_steps=6)
    batch = make_batch(num=2)
    lrs = [engine.train_step(batch, ppo_loss)["lr"] for _ in range(6)]
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(want)


def test_config_errors():
    with pytest.raises(ConfigError, match="total_steps"):
        FSDPEngine(make_model(), lr_schedule="cosine")
    with pytest.raises(ConfigError, match="lr_schedule"):
        FSDPEngine(make_model(), lr_schedule="linear")
    with pytest.raises(ConfigError, match="CUDA"):
        FSDPEngine(make_model(), mixed_precision="bf16", device="cpu")


def test_non_finite_loss_raises_and_skips_update():
    engine = make_engine()
    before = {n: w.clone() for n, w in engine.export_weights()}  # export may alias parameters

    def bad_loss(lp, ent, mb):
        return (lp * mb.loss_weights).sum() * float("nan"), {}

    with pytest.raises(TrainError, match="non-finite loss"):
        engine.train_step(make_batch(), bad_loss)
    for n, w in engine.export_weights():
        assert torch.equal(w, before[n])


class _Tokenizer:
    eos_token_id = -1  # never sampled: completions run to max_tokens

    def decode(self, ids, skip_special_tokens=False):
        return ""


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_export_to_local_engine_logprobs_match_trainer(temperature):
    trainer = make_engine(lr=1e-2)
    batch = make_batch()
    trainer.train_step(batch, ppo_loss)
    engine = LocalEngine(make_model(seed=123), _Tokenizer())  # different weights until the push
    await push_local(engine, trainer.export_weights(), version=1)
    assert engine.version == 1
    samples = []
    for seed, prompt in enumerate([[5, 9, 14], [7, 3, 22, 40, 41]]):
        out = (await engine.generate(GenerateRequest(
            prompt, SamplingParams(max_tokens=6, temperature=temperature, seed=seed)))).outputs[0]
        assert out.versions == [1] * len(out.token_ids)
        n = len(prompt)
        samples.append(Sample(prompt + out.token_ids, [0] * n + [1] * len(out.token_ids),
                              [0.0] * n + out.logprobs, [-1] * n + out.versions))
    await engine.close()
    replay = collate(samples, temperature=temperature)
    got = trainer.forward_logprobs(replay)
    mask = replay.loss_mask.bool()
    torch.testing.assert_close(got[mask], replay.old_logprobs[mask], atol=2e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_step_on_cuda():
    engine = make_engine(device="cuda")
    assert engine.mixed_precision == "bf16"
    batch = make_batch()
    first = engine.train_step(batch, ppo_loss)["loss"]
    assert math.isfinite(first)
    assert engine.forward_logprobs(batch).dtype == torch.float32


def test_loads_checkpoint_directories_and_tiny_specs(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    from_dir, from_obj = FSDPEngine(str(tmp_path / "ckpt")), FSDPEngine(make_model())
    batch = make_batch()
    torch.testing.assert_close(from_dir.forward_logprobs(batch), from_obj.forward_logprobs(batch))
    assert from_obj.tokenizer is None
    tiny = FSDPEngine("tiny:xs")
    ids = tiny.tokenizer("hello world, hello agents")["input_ids"]
    lp = tiny.forward_logprobs(collate([Sample(ids, [1] * len(ids), [0.0] * len(ids),
                                               [0] * len(ids))]))
    assert lp.shape == (1, len(ids)) and lp[0, 0] == 0 and (lp[0, 1:] < 0).all()


def test_export_tracks_updates_after_steps_and_loads(tmp_path):
    engine = make_engine(lr=1e-2)
    before = {n: w.clone() for n, w in engine.export_weights()}
    batch = make_batch()
    engine.train_step(batch, ppo_loss)
    engine.save(str(tmp_path / "c"))
    params = dict(engine.model.named_parameters())
    after = dict(engine.export_weights())
    assert any(not torch.equal(after[n], before[n]) for n in after)
    for n, w in after.items():
        assert torch.equal(w, params[n].detach()), n
    other = make_engine(lr=1e-2)
    stale = {n: w.clone() for n, w in other.export_weights()}
    other.load(str(tmp_path / "c"))
    for n, w in other.export_weights():
        assert torch.equal(w, after[n]) and (n not in before or torch.equal(stale[n], before[n]))
