"""ArchonEngine in one process: log-probs, a training step against a plain HF reference,
export with HF names, HF checkpoints and DCP save/load."""

from __future__ import annotations

import pytest
import torch

from areal_agents.errors import ConfigError
from areal_agents.trainers.archon import ArchonEngine, ModelArgs
from areal_agents.trainers.logprobs import full_logprobs

from .archon_helpers import hf_tiny, make_batch, pg_loss


def _reference_step(hf, batch, lr):
    """One AdamW step of the HF model on the whole batch (the semantics ArchonEngine must match)."""
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=0.0)
    logits = hf(batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    lp, ent = full_logprobs(logits, batch.input_ids, batch.attention_mask, batch.temperature)
    loss, _ = pg_loss(lp, ent, batch)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    opt.step()
    return float(loss.detach()), float(norm)


def test_forward_logprobs_match_transformers():
    hf = hf_tiny("qwen3")
    engine = ArchonEngine(hf, token_budget=32)
    batch = make_batch(temperature=0.7)
    lp = engine.forward_logprobs(batch)
    with torch.no_grad():
        logits = hf(batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    ref, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask, 0.7)
    assert lp.shape == batch.input_ids.shape
    assert (lp - ref).abs().max() <= 1e-5
    assert (lp[~batch.attention_mask] == 0).all() and (lp[:, 0] == 0).all()


@pytest.mark.parametrize("budget", [4096, 20])
def test_train_step_matches_reference(budget):
    hf = hf_tiny("qwen3", seed=1)
    engine = ArchonEngine(hf, lr=1e-2, token_budget=budget)
    batch = make_batch()
    stats = engine.train_step(batch, pg_loss)
    ref_loss, ref_norm = _reference_step(hf, batch, 1e-2)
    assert stats["loss"] == pytest.approx(ref_loss, abs=1e-5)
    assert stats["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert {"loss", "grad_norm", "lr", "entropy", "num_tokens", "skipped"} <= set(stats)
    exported = dict(engine.export_weights())
    assert set(exported) == set(hf.state_dict()) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    for name, t in hf.state_dict().items():
        assert (exported[name] - t).abs().max() <= 2e-5, name
    assert engine.step == 1


def test_save_load_resumes_identically(tmp_path):
    args = ModelArgs(vocab_size=96, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16)
    a = ArchonEngine(args, lr=1e-2, seed=3, warmup_steps=3)
    batch = make_batch()
    a.train_step(batch, pg_loss)
    a.version = 4
    a.save(str(tmp_path / "ckpt"))
    b = ArchonEngine(args, lr=1e-2, seed=9, warmup_steps=3)
    b.load(str(tmp_path / "ckpt"))
    assert (b.step, b.version) == (1, 4)
    sa, sb = a.train_step(batch, pg_loss), b.train_step(batch, pg_loss)
    assert sa["loss"] == pytest.approx(sb["loss"], abs=1e-7) and sa["lr"] == sb["lr"]
    for (n, x), (_, y) in zip(a.export_weights(), b.export_weights(), strict=True):
        assert torch.equal(x, y), n
    with pytest.raises(FileNotFoundError, match="not an Archon checkpoint"):
        b.load(str(tmp_path / "missing"))


def test_save_hf_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    engine = ArchonEngine(hf_tiny("qwen2", tie=True), lr=1e-2)
    batch = make_batch()
    engine.train_step(batch, pg_loss)
    engine.save_hf(str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    with torch.no_grad():
        logits = hf(batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    ref, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask)
    assert (engine.forward_logprobs(batch) - ref).abs().max() <= 1e-5


def test_activation_checkpointing_and_compile_keep_results():
    args = ModelArgs(vocab_size=96, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16)
    batch = make_batch()
    base = ArchonEngine(args, lr=1e-2, seed=2).train_step(batch, pg_loss)
    for kw in ({"activation_checkpoint": "full"}, {"activation_checkpoint": "selective"},
               {"compile": "eager"}):
        engine = ArchonEngine(args, lr=1e-2, seed=2, **kw)
        assert engine.train_step(batch, pg_loss)["loss"] == pytest.approx(base["loss"], abs=1e-6), kw
        assert "model.layers.0.attention.wqkv.weight" not in dict(engine.model.named_parameters())
        assert "layers.0.attention.wqkv.weight" in dict(engine.model.named_parameters())


@pytest.mark.parametrize("kw", [{"pack": False}, {"fused_projections": False},
                                {"pack": False, "fused_projections": False}])
def test_packing_and_fusion_do_not_change_results(kw):
    """Packed/fused (the defaults) and padded/unfused runs give the same log-probs, loss,
    gradient norm and updated weights."""
    hf = hf_tiny("qwen3", seed=4)
    batch = make_batch(lengths=(12, 3, 16, 7))
    a, b = ArchonEngine(hf, lr=1e-2), ArchonEngine(hf, lr=1e-2, **kw)
    assert a.module.pack and a.args.fused_projections
    assert b.module.pack == kw.get("pack", True)
    assert (a.forward_logprobs(batch) - b.forward_logprobs(batch)).abs().max() <= 1e-6
    sa, sb = a.train_step(batch, pg_loss), b.train_step(batch, pg_loss)
    assert sa["loss"] == pytest.approx(sb["loss"], abs=1e-6)
    assert sa["grad_norm"] == pytest.approx(sb["grad_norm"], rel=1e-5)
    wa, wb = dict(a.export_weights()), dict(b.export_weights())
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= 1e-6, name


def test_config_errors():
    args = ModelArgs(vocab_size=96, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16)
    with pytest.raises(ConfigError, match=r"not divisible by tp\*pp=2"):
        ArchonEngine(args, tp=2)
    with pytest.raises(ConfigError, match="must equal the world size"):
        ArchonEngine(args, dp_shard=2)
    with pytest.raises(ConfigError, match="activation_checkpoint"):
        ArchonEngine(args, activation_checkpoint="sometimes")
    with pytest.raises(ConfigError, match="total_steps"):
        ArchonEngine(args, lr_schedule="cosine")
    with pytest.raises(ConfigError, match="compile cannot be used with pp_schedule='ZBVZeroBubble'"):
        ArchonEngine(args, pp=2, pp_schedule="ZBVZeroBubble", compile=True)
    with pytest.raises(ConfigError, match="fused_projections=True cannot be combined"):
        ArchonEngine(args, fused_projections=True, lora={"rank": 2})


def test_pipeline_layer_split_counts():
    from areal_agents.trainers.archon.pipeline import layer_split

    assert layer_split(5, 2) == [range(0, 3), range(3, 5)]
    assert layer_split(4, 4, [1, 2, 1, 0]) == [range(0, 1), range(1, 3), range(3, 4), range(4, 4)]
    with pytest.raises(ConfigError, match="sum to n_layers=4"):
        layer_split(4, 4, [1, 1, 1, 0])
    with pytest.raises(ConfigError, match="cannot fill"):
        layer_split(1, 2)


def test_pipeline_head_backward_runs_once_under_split_backward(monkeypatch):
    """Zero-bubble split backward (input pass, then weight pass) through the pipeline's LM-head
    node: the shared head backward runs once and the gradients equal a plain backward."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    from areal_agents.trainers import logprobs
    from areal_agents.trainers.archon.pipeline import _HeadOnce

    calls = []
    orig = logprobs._ChunkedLogprobs.backward
    monkeypatch.setattr(logprobs._ChunkedLogprobs, "backward",
                        staticmethod(lambda ctx, *g: (calls.append(1), orig(ctx, *g))[1]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    proj = torch.nn.Linear(8, 8)
    head = torch.nn.Parameter(torch.randn(11, 8, generator=g))
    ids = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    lp, ent = _HeadOnce.apply(proj(x), head, ids, mask, 0.7)
    loss = -(lp.sum() + 0.1 * ent.sum())
    weights = [proj.weight, proj.bias, head]
    _, groups = stage_backward_input([loss], None, [x], iter(weights))
    assert head.grad is None and proj.weight.grad is None  # input pass: no weight grads yet
    stage_backward_weight(iter(weights), groups)
    assert len(calls) == 1
    x2 = x.detach().requires_grad_()
    proj2 = torch.nn.Linear(8, 8)
    proj2.load_state_dict(proj.state_dict())
    head2 = head.detach().clone().requires_grad_()
    lp2, ent2 = logprobs.sequence_logprobs(proj2(x2), head2, ids, mask, 0.7)
    (-(lp2.sum() + 0.1 * ent2.sum())).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert torch.allclose(head.grad, head2.grad, atol=1e-6)
    assert torch.allclose(proj.weight.grad, proj2.weight.grad, atol=1e-6)
