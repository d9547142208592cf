"""megatron-core pieces of the engine: process groups, the ``GPTModel`` and its forward.

Imports megatron-core at module import; ``areal_agents.trainers.megatron.engine`` imports this
module only after ``require_megatron()`` succeeded.

CPU notes (megatron-core 0.16): two functions of megatron's local layers call
``torch.cuda.current_device()`` unconditionally and fail on CPU with "Torch not compiled with
CUDA enabled": ``RotaryEmbedding.get_emb`` (moves ``inv_freq`` to CUDA) and
``DotProductAttention.forward`` (``GlobalMemoryBuffer.get_tensor`` allocates its score buffer
on CUDA, then ``get_cuda_rng_tracker().fork()`` swaps CUDA RNG states). So the engine builds
the RoPE table itself (``rotary_table``, same formula) and plugs ``SDPACoreAttention``
(``torch.nn.functional.scaled_dot_product_attention``) into megatron's layer spec as the core
attention — on every device, so CPU and GPU run the same math.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from areal_agents.errors import ConfigError
from areal_agents.trainers.megatron.convert import ModelSpec


def init_parallel(tp: int) -> None:
    """Ensure ``torch.distributed`` and megatron's ``parallel_state`` with TP size ``tp``.

    Without a process group, one-process gloo (NCCL on CUDA) is started on an in-memory store.
    The data-parallel size is ``world_size / tp`` (no pipeline / context parallelism).

    Raises:
        ConfigError: ``tp`` does not divide the world size, or megatron's model parallelism was
            already initialised with another TP size in this process.
    """
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ConfigError(f"tensor_parallel={tp} must divide the world size {world}")
    if ps.model_parallel_is_initialized():
        have = ps.get_tensor_model_parallel_world_size()
        if have != tp:
            raise ConfigError(
                f"megatron parallel_state is already initialised with TP={have} in this process; "
                f"every megatron engine of a process must use the same tensor_parallel (got {tp})"
            )
        return
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)


class SDPACoreAttention(MegatronModule):
    """Causal core attention with ``scaled_dot_product_attention`` (a megatron spec module).

    Takes megatron's ``[s, b, heads, head_dim]`` query and ``[s, b, groups, head_dim]``
    key/value of this TP rank and returns ``[s, b, heads * head_dim]``. ``attention_mask``
    (megatron convention: ``True`` = masked out) is combined with the causal mask when given.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: Any,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, **unused: Any) -> None:
        # unused: cp_comm_type and the process-group argument, named ``model_comm_pgs`` in
        # megatron-core 0.14 and ``pg_collection`` in 0.15+ (TP needs no group here)
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ConfigError("context parallelism needs TransformerEngine attention")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None,
                attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ConfigError("packed sequences / attention bias are not supported by SDPACoreAttention")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if attention_mask is None:
            mask, causal = None, True
        else:
            s_q, s_k = q.shape[2], k.shape[2]
            causal_mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
            mask, causal = causal_mask & ~attention_mask.bool(), False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=q.shape[1] != k.shape[1],
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def transformer_config(spec: ModelSpec, tp: int, dtype: torch.dtype = torch.float32,
                       **overrides: Any) -> TransformerConfig:
    """The megatron ``TransformerConfig`` of ``spec``: no fusions, no dropout, CPU init."""
    fields: dict[str, Any] = dict(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads, num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim, ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias, qk_layernorm=spec.qk_norm,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_gpt(spec: ModelSpec, config: TransformerConfig) -> GPTModel:
    """A megatron ``GPTModel`` (local layer spec, SDPA core attention) for ``spec``; weights
    are uninitialised (load them with ``load_state_dict``)."""
    layer_spec = get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    layer_spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return GPTModel(
        config, layer_spec, vocab_size=spec.padded_vocab,
        max_sequence_length=spec.max_position_embeddings,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
        rope_scaling=spec.rope_scaling_factor is not None,
        rope_scaling_factor=spec.rope_scaling_factor or 8.0,
    )


def rotary_table(model: GPTModel, seq_len: int) -> torch.Tensor:
    """``[s, 1, 1, head_dim]`` RoPE angles, as ``RotaryEmbedding.get_emb`` but on any device."""
    rope = model.rotary_pos_emb
    freqs = rope.get_freqs_non_repeated(seq_len)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def hidden_states(model: GPTModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states ``[b, s, hidden]`` of right-padded ``input_ids`` ``[b, s]``.

    Runs megatron's embedding and decoder (``TransformerBlock``, final norm included); the
    causal mask alone suffices because padding only follows real tokens.
    """
    b, s = input_ids.shape
    rope = model.rotary_pos_emb
    if rope.inv_freq.device != input_ids.device:
        rope.inv_freq = rope.inv_freq.to(input_ids.device)
    positions = torch.arange(s, device=input_ids.device)[None].expand(b, s)
    emb = model.embedding(input_ids=input_ids, position_ids=positions)  # [s, b, h]
    hidden = model.decoder(hidden_states=emb, attention_mask=None,
                           rotary_pos_emb=rotary_table(model, s))
    return hidden.transpose(0, 1)


def checkpoint_layers(model: GPTModel) -> None:
    """Recompute every decoder layer in the backward pass (``torch.utils.checkpoint``).

    megatron's own ``recompute_granularity`` needs CUDA: ``tensor_parallel.random.
    CheckpointFunction.forward`` saves CUDA RNG states (``_get_cuda_rng_state``). PyTorch's
    non-reentrant checkpoint saves the device's RNG state itself and runs anywhere; each
    layer's ``forward`` is wrapped in place, so parameter names do not change.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in model.decoder.layers:
        forward = layer.forward

        def run(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = run


def lm_head_shard(model: GPTModel) -> torch.Tensor:
    """This TP rank's ``[padded_vocab / tp, hidden]`` rows of the LM-head weight (the
    embedding's when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
