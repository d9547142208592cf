"""HF ⇄ megatron-core ``GPTModel`` state dicts, and tensor-parallel (TP) sharding rules.

Pure PyTorch (no megatron import), so the layout math is tested without megatron-core.

Three layouts of the same weights:

* **HF**: ``transformers`` names (``model.layers.0.self_attention.q_proj.weight``, ...).
* **Megatron full**: megatron-core ``GPTModel`` names with TP=1 shapes. Q, K and V are fused in
  ``linear_qkv`` *grouped by KV head*: for each query group ``g`` the rows are the ``heads /
  kv_heads`` query heads of ``g``, then ``g``'s key head, then its value head (biases alike).
  ``linear_fc1`` is ``cat(gate_proj, up_proj)``. The embedding (and untied output layer) rows
  are padded with zeros to ``padded_vocab`` so they split evenly over TP ranks.
* **Megatron shard**: one TP rank's slice. ``linear_qkv``, the embedding and the output layer
  are split along dim 0 (whole query groups, vocab rows), ``linear_proj`` and ``linear_fc2``
  along dim 1; ``linear_fc1`` is ``cat(gate_r, up_r)`` — rank ``r``'s share of each half; norms
  are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from areal_agents.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")


@dataclass(frozen=True)
class ModelSpec:
    """The architecture fields the conversion and the megatron model need.

    Attributes:
        padded_vocab: ``vocab_size`` rounded up to a multiple of the TP size.
        qkv_bias: Q/K/V projections carry a bias (Qwen2, Llama with ``attention_bias``).
        qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3).
        rope_scaling_factor: Llama-3 RoPE scaling factor (``None``: no scaling).
    """

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    padded_vocab: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling_factor: float | None = None


# megatron-core's RotaryEmbedding hard-codes these Llama-3 scaling constants (only the factor
# is a parameter); HF configs with other values cannot be expressed.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(config: Any) -> tuple[float, float | None]:
    """``(rope_theta, llama3 scaling factor or None)`` of a HF config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update(getattr(config, "rope_scaling", None) or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ConfigError("the HF config has no rope_theta (nor rope_parameters['rope_theta'])")
    if kind == "default":
        return float(theta), None
    if kind == "llama3" and all(float(params.get(k, -1)) == v for k, v in _LLAMA3_FIXED.items()):
        return float(theta), float(params["factor"])
    raise ConfigError(
        f"RoPE scaling {kind!r} with {params} is not supported by the megatron backend: "
        f"megatron-core supports 'llama3' with {_LLAMA3_FIXED} only; use backend='archon' "
        "or 'fsdp'"
    )


def spec_from_hf_config(config: Any, tp_size: int = 1) -> ModelSpec:
    """A ``ModelSpec`` from a ``transformers`` Qwen2 / Qwen3 / Llama config.

    Raises:
        ConfigError: another ``model_type``, RoPE scaling, MLP biases, sliding-window
            attention, or head counts that do not split over ``tp_size`` ranks.
    """
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type {kind!r} is not supported by the megatron backend; supported: "
            f"{list(SUPPORTED_MODEL_TYPES)} (use backend='fsdp' for any other HF model)"
        )
    if getattr(config, "mlp_bias", False):
        raise ConfigError("MLP biases (mlp_bias=True) are not supported by the megatron backend")
    if getattr(config, "use_sliding_window", False):
        raise ConfigError("sliding-window attention is not supported by the megatron backend")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if kv_heads % tp_size or heads % tp_size:
        raise ConfigError(
            f"tensor parallel size {tp_size} must divide the attention heads ({heads}) and the "
            f"key/value heads ({kv_heads})"
        )
    if config.intermediate_size % tp_size:
        raise ConfigError(f"tp={tp_size} must divide intermediate_size={config.intermediate_size}")
    qkv_bias = kind == "qwen2" or bool(getattr(config, "attention_bias", False))
    if getattr(config, "attention_bias", False) and kind == "qwen3":
        raise ConfigError("Qwen3 with attention_bias=True (biased o_proj) is not supported")
    vocab = config.vocab_size
    theta, scaling = _rope(config)
    return ModelSpec(
        model_type=kind,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=config.intermediate_size,
        vocab_size=vocab,
        padded_vocab=-(-vocab // tp_size) * tp_size,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=kind == "qwen3",
        norm_eps=float(config.rms_norm_eps),
        rope_theta=theta,
        max_position_embeddings=config.max_position_embeddings,
        rope_scaling_factor=scaling,
    )


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], 0)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """``linear_qkv`` rows (weights ``[*, hidden]`` or biases ``[*]``) from HF q, k, v."""
    g, d = spec.num_kv_heads, spec.head_dim
    r = spec.num_heads // g
    rest = q.shape[1:]
    parts = [q.reshape(g, r * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(parts, 1).reshape(g * (r + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``: HF ``(q, k, v)`` from ``linear_qkv`` rows."""
    g, d = spec.num_kv_heads, spec.head_dim
    r = spec.num_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (r + 2) * d, *rest)
    q, k, v = torch.split(grouped, [r * d, d, d], 1)
    return q.reshape(g * r * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)


_LAYER_NAMES = {  # HF suffix -> megatron suffix (one-to-one tensors of a decoder layer)
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_QK_NORM_NAMES = {  # Qwen3 only
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
}


def _layer_names(spec: ModelSpec) -> dict[str, str]:
    return {**_LAYER_NAMES, **_QK_NORM_NAMES} if spec.qk_norm else _LAYER_NAMES


def megatron_tensor(name: str, hf: Mapping[str, torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """One megatron *full* tensor, built from the HF tensors it needs (read lazily from ``hf``).

    Raises:
        KeyError: ``name`` is not a megatron tensor of ``spec``, or ``hf`` lacks a source.
    """
    if name == "embedding.word_embeddings.weight":
        return _pad_rows(hf["model.embed_tokens.weight"], spec.padded_vocab)
    if name == "output_layer.weight" and not spec.tie_embeddings:
        return _pad_rows(hf["lm_head.weight"], spec.padded_vocab)
    if name == "decoder.final_layernorm.weight":
        return hf["model.norm.weight"]
    layer, _, suffix = name.removeprefix("decoder.layers.").partition(".")
    if not name.startswith("decoder.layers.") or not layer.isdigit() or int(layer) >= spec.num_layers:
        raise KeyError(f"{name!r} is not a megatron tensor of this model")
    src = f"model.layers.{layer}."
    hf_name = {mc: h for h, mc in _layer_names(spec).items()}.get(suffix)
    if hf_name is not None:
        return hf[src + hf_name]
    kind = suffix.rpartition(".")[2]  # weight | bias
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias") and (
            kind == "weight" or spec.qkv_bias):
        return fuse_qkv(*(hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"), spec)
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat([hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], 0)
    raise KeyError(f"{name!r} is not a megatron tensor of this model")


def megatron_names(spec: ModelSpec) -> list[str]:
    """Every megatron *full* tensor name of ``spec``, in ``GPTModel`` parameter order."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attention.linear_proj.weight",
                  p + "self_attention.linear_qkv.weight"]
        names += [p + "self_attention.linear_qkv.bias"] if spec.qkv_bias else []
        names += [p + "self_attention.q_layernorm.weight",
                  p + "self_attention.k_layernorm.weight"] if spec.qk_norm else []
        names += [p + "pre_mlp_layernorm.weight", p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    return names + ([] if spec.tie_embeddings else ["output_layer.weight"])


def hf_to_megatron(hf: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """HF state dict -> megatron *full* (TP=1 layout) state dict.

    Raises:
        KeyError: a tensor the architecture needs is missing from ``hf``.
    """
    return {name: megatron_tensor(name, hf, spec) for name in megatron_names(spec)}


def hf_tensors(name: str, full: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """The HF ``(name, tensor)`` pairs held by one megatron *full* tensor (views, no copies).

    Inverse of ``megatron_tensor``: ``linear_qkv`` gives q/k/v, ``linear_fc1`` gate/up, the
    embedding and output layer lose their vocab padding.

    Raises:
        KeyError: ``name`` is not a megatron tensor of ``spec``.
    """
    v = spec.vocab_size
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", full[:v])]
    if name == "output_layer.weight" and not spec.tie_embeddings:
        return [("lm_head.weight", full[:v])]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", full)]
    layer, _, suffix = name.removeprefix("decoder.layers.").partition(".")
    if not name.startswith("decoder.layers.") or not layer.isdigit() or int(layer) >= spec.num_layers:
        raise KeyError(f"{name!r} is not a megatron tensor of this model")
    dst = f"model.layers.{layer}."
    hf_name = {mc: h for h, mc in _layer_names(spec).items()}.get(suffix)
    if hf_name is not None:
        return [(dst + hf_name, full)]
    kind = suffix.rpartition(".")[2]
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias") and (
            kind == "weight" or spec.qkv_bias):
        q, k, vv = split_qkv(full, spec)
        return [(f"{dst}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, vv), strict=True)]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2, 0)
        return [(dst + "mlp.gate_proj.weight", gate), (dst + "mlp.up_proj.weight", up)]
    raise KeyError(f"{name!r} is not a megatron tensor of this model")


def megatron_to_hf(mc: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Megatron *full* state dict -> HF state dict (vocab padding removed).

    A tied model gets no ``lm_head.weight`` (``transformers`` ties it to the embedding).
    """
    return {hf: t for name in megatron_names(spec) for hf, t in hf_tensors(name, mc[name], spec)}


def tp_split_dim(name: str) -> int | None:
    """The dim a megatron tensor is split along over TP ranks (``None``: replicated)."""
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight",
                      "word_embeddings.weight", "output_layer.weight")):
        return 0
    return None


def shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s slice of the megatron *full* tensor ``name`` (a view when possible)."""
    dim = tp_split_dim(name)
    if dim is None or tp_size == 1:
        return full
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, 0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
    return full.chunk(tp_size, dim)[tp_rank]


def unshard(name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The megatron *full* tensor from every TP rank's slice (inverse of ``shard``)."""
    dim = tp_split_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        halves = [s.chunk(2, 0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
    return torch.cat(list(shards), dim)
