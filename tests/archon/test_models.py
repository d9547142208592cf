"""Archon dense models: logits parity with transformers and HF checkpoints both ways."""

from __future__ import annotations

import pytest
import torch

from areal_agents.trainers.archon.models import (
    ModelArgs,
    Transformer,
    from_hf,
    fuse_state,
    load_hf_checkpoint,
    relayout,
    save_hf_checkpoint,
    to_hf_state_dict,
    unfuse_state,
)

from .archon_helpers import hf_tiny

FAMILIES = [("qwen3", False), ("qwen3", True), ("qwen2", False), ("llama", False)]


def _tokens(vocab: int, seed: int = 1, shape=(3, 40)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(("family", "tie"), FAMILIES)
def test_logits_parity_with_transformers(family, tie, fused):
    hf = hf_tiny(family, tie=tie)
    model = from_hf(hf, fused=fused).eval()
    assert hasattr(model.layers["0"].attention, "wqkv") == fused
    assert hasattr(model.layers["0"].feed_forward, "w13") == fused
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
    a = model.args
    assert model.layers["0"].attention.wqkv.weight.shape == ((6 + 2 * 3) * a.head_dim, 48)
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


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "qwen3_moe"])
def test_fused_layout_converter_roundtrip(family):
    """HF -> fused Archon -> HF is exact; fused and unfused layouts convert into each other
    exactly (biases included for Qwen2), and ``relayout`` keeps the logits."""
    hf = hf_tiny(family)
    fused, plain = from_hf(hf, fused=True), from_hf(hf, fused=False)
    ref = hf.state_dict()
    back = to_hf_state_dict(fused)
    assert set(back) == set(to_hf_state_dict(plain))
    for name, t in back.items():
        if ".mlp.experts." not in name:  # transformers keeps MoE experts fused in memory
            assert torch.equal(t, ref[name]), name
    q = fused.layers["0"].attention.wqkv.weight
    assert torch.equal(q[:64], ref["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(q[64:96], ref["model.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(q[96:], ref["model.layers.0.self_attn.v_proj.weight"])
    if family == "qwen2":
        assert torch.equal(fused.layers["1"].attention.wqkv.bias[96:],
                           ref["model.layers.1.self_attn.v_proj.bias"])
    unf = unfuse_state(fused.state_dict())
    assert set(unf) == set(plain.state_dict())
    assert all(torch.equal(unf[k], v) for k, v in plain.state_dict().items())
    refused = fuse_state(plain.state_dict())
    assert set(refused) == set(fused.state_dict())
    assert all(torch.equal(refused[k], v) for k, v in fused.state_dict().items())
    ids = _tokens(96, shape=(2, 11))
    with torch.no_grad():
        assert (relayout(fused, False)(ids) - fused(ids)).abs().max().item() <= 1e-6
        assert (relayout(plain, True)(ids) - plain(ids)).abs().max().item() <= 1e-6
    assert relayout(fused, True) is fused
    with pytest.raises(KeyError, match="cannot fuse"):
        fuse_state({"layers.0.attention.wq.weight": torch.zeros(2, 2)})


def test_init_weights_do_not_depend_on_layout():
    args = ModelArgs(vocab_size=96, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16)
    models = []
    for fused in (True, False):
        m = Transformer(ModelArgs(**{**args.__dict__, "fused_projections": fused}))
        m.init_weights(seed=4)
        models.append(to_hf_state_dict(m))
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert models[0]["model.layers.1.input_layernorm.weight"].eq(1).all()


def test_packing_roundtrip_and_positions():
    from areal_agents.trainers.archon.models.qwen3 import Packing

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    p = Packing.from_mask(mask)
    assert p.index.tolist() == [0, 1, 2, 4, 5] and p.positions().tolist() == [0, 1, 2, 0, 1]
    x = torch.arange(5.0)[:, None].repeat(1, 3)
    full = p.unpack(x)
    assert full.shape == (2, 4, 3) and full[0, 3].eq(0).all() and full[1, 1, 0] == 4
    assert torch.equal(p.pack(full), x)
