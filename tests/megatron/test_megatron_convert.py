"""HF ⇄ megatron layout math in pure PyTorch (runs without megatron-core)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron_helpers import hf_model

from areal_agents.errors import ConfigError
from areal_agents.trainers.megatron.convert import (
    fuse_qkv,
    hf_to_megatron,
    megatron_names,
    megatron_to_hf,
    shard,
    spec_from_hf_config,
    split_qkv,
    tp_split_dim,
    unshard,
)


@pytest.mark.parametrize(("family", "tie"), [("qwen3", None), ("qwen2", False), ("llama", True)])
def test_hf_megatron_round_trip_is_exact(family, tie):
    model = hf_model(family, tie=tie)
    spec = spec_from_hf_config(model.config)
    hf = dict(model.named_parameters())  # tied: lm_head appears once, as the embedding
    mc = hf_to_megatron(hf, spec)
    assert ("output_layer.weight" in mc) == (not spec.tie_embeddings)
    assert spec.qk_norm == (family == "qwen3") and spec.qkv_bias == (family == "qwen2")
    back = megatron_to_hf(mc, spec)
    assert back.keys() == hf.keys()
    for name, t in hf.items():
        assert torch.equal(back[name], t), name


def test_lazy_safetensors_checkpoint_reads_sharded_directories(tmp_path):
    from areal_agents.trainers.megatron.hf_io import SafetensorsCheckpoint, read_hf_directory

    model = hf_model("qwen2")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    lazy = SafetensorsCheckpoint(tmp_path)
    assert len({str(f) for f in lazy._files.values()}) > 1  # really sharded
    want = model.state_dict()
    assert set(lazy) == set(want)
    for name, t in want.items():
        assert torch.equal(lazy[name], t), name
    spec = spec_from_hf_config(model.config)
    converted = hf_to_megatron(lazy, spec)
    assert list(converted) == megatron_names(spec)
    config, _, tokenizer = read_hf_directory(tmp_path)
    assert config.model_type == "qwen2" and tokenizer is None
    with pytest.raises(FileNotFoundError, match=r"config\.json missing"):
        read_hf_directory(tmp_path / "nowhere")


def test_fused_qkv_rows_follow_megatrons_grouped_layout():
    """Megatron reads ``x @ linear_qkv.T`` as ``[groups, (heads/groups + 2) * d]``: each group's
    query heads, then its key head, then its value head; query head j belongs to group
    j // (heads/groups) as in HF's GQA."""
    model = hf_model("qwen3")
    spec = spec_from_hf_config(model.config)
    attn = model.model.layers[0].self_attn
    x = torch.randn(5, spec.hidden_size)
    mixed = x @ fuse_qkv(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, spec).T
    g, r, d = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, spec.head_dim
    grouped = mixed.view(5, g, r + 2, d)
    q = (x @ attn.q_proj.weight.T).view(5, spec.num_heads, d)
    k = (x @ attn.k_proj.weight.T).view(5, g, d)
    v = (x @ attn.v_proj.weight.T).view(5, g, d)
    for head in range(spec.num_heads):
        torch.testing.assert_close(grouped[:, head // r, head % r], q[:, head])
    torch.testing.assert_close(grouped[:, :, r], k)
    torch.testing.assert_close(grouped[:, :, r + 1], v)
    back = split_qkv(fuse_qkv(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, spec), spec)
    for a, b in zip(back, (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight), strict=True):
        assert torch.equal(a, b)


def test_tp_shards_compute_the_full_layers():
    """Column-parallel fc1/qkv and row-parallel fc2 shards reproduce the unsharded MLP/QKV."""
    model = hf_model("qwen3")
    spec = spec_from_hf_config(model.config, tp_size=2)
    mc = hf_to_megatron(dict(model.named_parameters()), spec)
    prefix = "decoder.layers.1."
    x = torch.randn(4, spec.hidden_size)
    fc1, fc2 = mc[prefix + "mlp.linear_fc1.weight"], mc[prefix + "mlp.linear_fc2.weight"]
    full_gate, full_up = (x @ fc1.T).chunk(2, -1)
    want = (F.silu(full_gate) * full_up) @ fc2.T
    got = torch.zeros_like(want)
    for rank in range(2):  # each rank: its [gate_r; up_r] rows, its fc2 columns; outputs summed
        gate, up = (x @ shard(prefix + "mlp.linear_fc1.weight", fc1, rank, 2).T).chunk(2, -1)
        got += (F.silu(gate) * up) @ shard(prefix + "mlp.linear_fc2.weight", fc2, rank, 2).T
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    qkv = mc[prefix + "self_attention.linear_qkv.weight"]
    per_rank = [shard(prefix + "self_attention.linear_qkv.weight", qkv, r, 2) for r in range(2)]
    rows = (spec.num_heads // spec.num_kv_heads + 2) * spec.head_dim
    assert per_rank[1].shape[0] == rows * spec.num_kv_heads // 2  # whole query groups per rank
    for name, full in mc.items():
        parts = [shard(name, full, r, 2) for r in range(2)]
        assert torch.equal(unshard(name, parts), full), name
        if tp_split_dim(name) is None:
            assert parts[0] is full


def test_vocab_is_padded_for_tp_and_unpadded_on_export():
    model = hf_model("llama")  # vocab 96
    model.resize_token_embeddings(95)
    spec = spec_from_hf_config(model.config, tp_size=2)
    assert (spec.vocab_size, spec.padded_vocab) == (95, 96)
    mc = hf_to_megatron(dict(model.named_parameters()), spec)
    assert mc["embedding.word_embeddings.weight"].shape[0] == 96
    assert torch.all(mc["output_layer.weight"][95:] == 0)
    assert megatron_to_hf(mc, spec)["lm_head.weight"].shape[0] == 95


def test_unsupported_configs_name_the_problem():
    from transformers import GPT2Config, Qwen3Config

    with pytest.raises(ConfigError, match=r"model_type 'gpt2' .*supported: \['qwen2', 'qwen3', 'llama'\]"):
        spec_from_hf_config(GPT2Config())
    cfg = Qwen3Config(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16)
    with pytest.raises(ConfigError, match="tensor parallel size 4 must divide"):
        spec_from_hf_config(cfg, tp_size=4)
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(ConfigError, match="RoPE scaling 'yarn'"):
        spec_from_hf_config(cfg)
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(ConfigError, match="supports 'llama3' with"):
        spec_from_hf_config(cfg)
    cfg.rope_parameters["original_max_position_embeddings"] = 8192
    assert spec_from_hf_config(cfg).rope_scaling_factor == 8.0


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("sampling", [None, ([0.5, 1.3, 0.0], [5, 0, 3], [1.0, 0.9, 0.5])],
                         ids=["temperature", "per-row-top-k-top-p"])
def test_vocab_parallel_logprobs_match_the_shared_chunked_math(sampling):
    """2 gloo ranks, each with half the (padded) vocab rows: log-probs, entropy and gradients
    equal ``sequence_logprobs`` on the full weight (pure torch.distributed, no megatron), also
    with per-row temperature/top-k/top-p (the cut-off needs the whole vocabulary)."""
    from megatron_helpers import vocab_parallel_case

    from areal_agents.trainers.launcher import launch
    from areal_agents.trainers.logprobs import RowSampling, sequence_logprobs

    r0, r1 = launch(2, vocab_parallel_case, 95, 96, 0.7, sampling)
    g = torch.Generator().manual_seed(0)  # the worker's case, rebuilt
    hidden = torch.randn(3, 7, 16, generator=g).requires_grad_(True)
    weight = torch.randn(96, 16, generator=g)
    ids = torch.randint(0, 95, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    a, b = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    w = weight[:95].clone().requires_grad_(True)
    rows = 0.7 if sampling is None else RowSampling(*(torch.tensor(x) for x in sampling))
    lp, ent = sequence_logprobs(hidden, w, ids, mask, rows, 4)
    ((a * lp).sum() + (b * ent).sum()).backward()
    for got in (r0, r1):  # identical on both ranks
        torch.testing.assert_close(got[0], lp.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ent.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[2], hidden.grad, atol=1e-5, rtol=1e-5)
    grad_rows = torch.cat([r0[3], r1[3]])
    torch.testing.assert_close(grad_rows[:95], w.grad, atol=1e-5, rtol=1e-5)
    assert torch.all(grad_rows[95:] == 0)  # padding rows get no gradient
    assert (lp != 0).sum() == mask[:, 1:].sum()
