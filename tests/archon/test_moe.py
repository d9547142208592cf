"""Qwen3-MoE on Archon: logits and load-balancing loss parity with transformers, training."""

from __future__ import annotations

import pytest
import torch

from areal_agents.trainers.archon import ArchonEngine
from areal_agents.trainers.archon.models import from_hf, save_hf_checkpoint, to_hf_state_dict

from .archon_helpers import hf_tiny, make_batch, pg_loss


@pytest.mark.parametrize("norm_topk", [True, False])
def test_moe_logits_and_aux_parity(norm_topk):
    hf = hf_tiny("qwen3_moe", norm_topk_prob=norm_topk)
    with torch.no_grad():  # a non-trivial router so experts really differ per token
        for n, p in hf.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    model = from_hf(hf).eval()
    assert model.args.is_moe and model.args.norm_topk_prob == norm_topk
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        got = model(ids)
    assert (got - ref.logits).abs().max().item() <= 1e-5
    assert model.aux_loss().item() == pytest.approx(ref.aux_loss.item(), abs=1e-6)


def test_moe_checkpoint_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = from_hf(hf_tiny("qwen3_moe")).eval()
    save_hf_checkpoint(to_hf_state_dict(model).items(), model.args, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-5


def test_moe_engine_trains_with_aux_loss():
    engine = ArchonEngine(hf_tiny("qwen3_moe"), lr=1e-2)
    batch = make_batch()
    before = engine.model.layers["0"].feed_forward.router.weight.detach().clone()
    stats = engine.train_step(batch, pg_loss)
    assert stats["aux_loss"] > 0 and torch.isfinite(torch.tensor(stats["grad_norm"]))
    assert not torch.equal(before, engine.model.layers["0"].feed_forward.router.weight)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in dict(
        engine.export_weights(experts="per_expert"))  # checkpoint / vLLM names
    assert "model.layers.1.mlp.experts.gate_up_proj" in dict(engine.export_weights())  # served
