"""Archon dense models: logits parity with transformers and HF checkpoints both ways."""

from __future__ import annotations

import pytest
import torch
from areal_agents.trainers.archon.models import (
    ModelArgs,
    Transformer,
    from_hf,
    load_hf_checkpoint,
    save_hf_checkpoint,
    to_hf_state_dict,
)

from .archon_helpers import hf_tiny

FAMILIES = [("qwen3", False), ("qwen3", True), ("qwen2", False), ("llama", False)]


def _tokens(vocab: int, seed: int = 1, shape=(3, 40)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("family", "tie"), FAMILIES)
def test_logits_parity_with_transformers(family, tie):
    hf = hf_tiny(family, tie=tie)
    model = from_hf(hf).eval()
    assert model.args.qk_norm == (family == "qwen3")
    assert model.args.qkv_bias == (family == "qwen2")
    assert (model.args.rope_scaling is not None) == (family == "llama")
    ids = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)
    assert got.shape == ref.shape == (3, 40, 96)
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_random_config_parity(family):
    import transformers as tf

    torch.manual_seed(3)
    cfg = {"qwen3": tf.Qwen3Config, "qwen2": tf.Qwen2Config, "llama": tf.LlamaConfig}[family](
        vocab_size=50, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
    )
    hf = getattr(tf, cfg.architectures[0] if cfg.architectures else {
        "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[family])(cfg).eval()
    model = from_hf(hf).eval()
    ids = _tokens(50, seed=4, shape=(2, 17))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shard", [None, 40_000])
def test_saved_checkpoint_loads_in_transformers(tmp_path, shard):
    from transformers import AutoModelForCausalLM

    args = ModelArgs(vocab_size=96, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16)
    model = Transformer(args)
    model.init_weights(seed=5)
    save_hf_checkpoint(to_hf_state_dict(model).items(), args, str(tmp_path), max_shard_bytes=shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    ids = _tokens(96)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-5
    # and back: the directory loads into a fresh Archon model
    other = Transformer(args)
    load_hf_checkpoint(other, str(tmp_path))
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_hf_directory_roundtrip(tmp_path):
    hf = hf_tiny("qwen2")
    hf.save_pretrained(str(tmp_path))
    model = from_hf(str(tmp_path)).eval()
    ids = _tokens(96)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_unknown_family_is_rejected():
    import transformers as tf

    with pytest.raises(ValueError, match="no model for model_type"):
        ModelArgs.from_hf_config(tf.GPT2Config())
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_hf("/nonexistent-dir-for-archon-test")


def test_tiny_factory_parity():
    from areal_agents.models import tiny

    hf, _ = tiny("xs", seed=0)
    hf = hf.float().eval()
    model = from_hf(hf).eval()
    assert model.args.tie_embeddings
    ids = _tokens(hf.config.vocab_size, shape=(2, 33))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5
