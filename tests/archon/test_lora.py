"""Native LoRA on Archon: only adapters train, merged export and PEFT-format adapters load."""

from __future__ import annotations

import pytest
import torch

from areal_agents.errors import ConfigError
from areal_agents.trainers.archon import ArchonEngine
from areal_agents.trainers.archon.lora import LoRAConfig
from areal_agents.trainers.logprobs import full_logprobs

from .archon_helpers import hf_tiny, make_batch, pg_loss

LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "wv", "layers.1.feed_forward.w*"]}


def _trained(hf):
    engine = ArchonEngine(hf, lr=1e-2, lora=LORA)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    batch = make_batch()
    engine.train_step(batch, pg_loss)
    engine.train_step(batch, pg_loss)
    return engine, before, batch


def test_only_adapters_train():
    engine, before, _ = _trained(hf_tiny("qwen3"))
    trainable = set(engine.trainable_parameters())
    assert trainable == {
        f"layers.{i}.attention.{m}.lora_{k}" for i in (0, 1) for m in ("wq", "wv") for k in "AB"
    } | {f"layers.1.feed_forward.{m}.lora_{k}" for m in ("w1", "w2", "w3") for k in "AB"}
    for n, p in engine.model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), n


def test_merged_export_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    engine, _, batch = _trained(hf_tiny("qwen3"))
    engine.save_hf(str(tmp_path))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    with torch.no_grad():
        logits = merged(batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    ref, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask)
    lp = engine.forward_logprobs(batch)
    assert (lp - ref).abs().max() <= 1e-5
    assert not any("lora" in n for n, _ in engine.export_weights())


def test_peft_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    hf = hf_tiny("qwen3")
    base = hf_tiny("qwen3")  # same seed: identical base weights
    engine, _, batch = _trained(hf)
    engine.save_lora_adapter(str(tmp_path))
    names = dict(engine.export_weights(merge_lora=False))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    ref, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask)
    assert (engine.forward_logprobs(batch) - ref).abs().max() <= 1e-5


def test_lora_errors():
    with pytest.raises(ConfigError, match="match no linear layer"):
        ArchonEngine(hf_tiny("qwen3"), lora={"target_modules": ["nothing_here"]})
    with pytest.raises(ConfigError, match="rank must be"):
        ArchonEngine(hf_tiny("qwen3"), lora=LoRAConfig(rank=0))
    with pytest.raises(ConfigError, match="needs an engine built with lora"):
        ArchonEngine(hf_tiny("qwen3")).save_lora_adapter("/tmp/never-written")


def test_peft_style_options_are_accepted():
    from peft import LoraConfig

    from areal_agents.trainers.archon.lora import lora_config

    cfg = lora_config({"r": 2, "lora_alpha": 4, "lora_dropout": 0.1, "task_type": "CAUSAL_LM",
                       "target_modules": ["q_proj"]})
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.scaling) == (2, 4, 0.1, 2.0)
    peft_cfg = lora_config(LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    assert (peft_cfg.rank, peft_cfg.alpha, peft_cfg.target_modules) == (4, 8, ["v_proj"])
    with pytest.raises(ConfigError, match="unknown LoRA option 'rnk'"):
        lora_config({"rnk": 2})
    engine = ArchonEngine(hf_tiny("qwen3"), lora={"r": 2, "lora_alpha": 4, "target_modules": ["o_proj"]})
    assert set(engine.trainable_parameters()) == {f"layers.{i}.attention.wo.lora_{k}" for i in (0, 1) for k in "AB"}
