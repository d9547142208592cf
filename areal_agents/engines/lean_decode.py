"""One decode step through the decoder layers of an allow-listed causal LM, layer by layer.

``decode_layers`` computes what ``layer(hidden, attention_mask=mask, cache=cache, ...)`` computes
for every decoder layer of a ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM``
(transformers, "sdpa" attention, one query token per row): the same torch ops on the same
tensors in the same order, so the same bits, without the Python between them (module
``__call__`` dispatch, keyword plumbing, the attention-interface lookup, ``Cache.update``
bookkeeping, the sdpa wrapper's checks). Per layer, in the order of the model's own forward:

    residual = h; h = input_layernorm(h)                      # RMSNorm
    q, k, v = q_proj(h), k_proj(h), v_proj(h)                 # [batch, 1, heads * head_dim]
    q, k = q_norm(q), k_norm(k)                               # Qwen3 only, per head
    q, k = q * cos + rotate_half(q) * sin, (same for k)       # rotary
    k, v = cache.layers[i].update(k, v)                       # BufferedLayer: in place
    a = sdpa(q, k, v, mask, scale)                            # GQA as transformers does it
    h = residual + o_proj(a)
    h = h + down_proj(silu(gate_proj(post_attention_layernorm(h))) * up_proj(...))

GQA follows transformers' sdpa path: ``enable_gqa=True`` where ``use_gqa_in_sdpa`` says so (no
mask), else the single query token's heads are packed onto the key/value heads
(``[batch, kv_heads, groups, head_dim]``); never ``repeat_kv`` (one query token).

What is not exactly the modules' own code runs through the modules themselves, so it stays
correct: a linear layer that is not a plain ``nn.Linear`` (LoRA adapters'
``MultiLoRALinear``), a norm, MLP or activation of another class, and any module with forward
hooks or an instance-level ``forward`` are called as modules; a decoder layer whose layer or
attention module is not the model's own class, has hooks, a sliding window, attention dropout,
an attention implementation other than transformers' own sdpa, or a cache whose ``update`` is
not ``Cache.update`` (or that offloads) runs its own forward (``layer(...)``, today's path).
The cache layer's own ``update`` appends (``BufferedLayer``: in place, returning the live
view). Pinned bit for bit against the model's forward in tests/engines/test_lean_decode.py.
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward, use_gqa_in_sdpa
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["decode_layers"]


class _Family(NamedTuple):
    """The module classes of one model family (``LlamaDecoderLayer``, ``LlamaAttention``, ...)."""

    layer: type
    attention: type
    mlp: type
    norm: type


@functools.cache
def _family(model_type: type) -> _Family | None:
    """The classes that ``model_type``'s own modeling module defines for its layers, or None."""
    module = sys.modules.get(model_type.__module__)
    prefix = model_type.__name__.removesuffix("ForCausalLM")
    classes = [getattr(module, prefix + part, None)
               for part in ("DecoderLayer", "Attention", "MLP", "RMSNorm")]
    return None if None in classes else _Family(*classes)


def _plain(module: nn.Module) -> bool:
    """No forward (pre-)hooks, no accelerate hook, no instance-level ``forward`` on ``module``."""
    state = module.__dict__
    return not (state["_forward_hooks"] or state["_forward_pre_hooks"] or "forward" in state
                or "_hf_hook" in state)


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``: ``F.linear`` itself for a plain ``nn.Linear`` (what its forward calls)."""
    if type(module) is nn.Linear and _plain(module):
        params = module._parameters
        return F.linear(x, params["weight"], params["bias"])
    return module(x)


def _norm(module: nn.Module, cls: type, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for the family's RMSNorm: the same ops as its forward (float32 variance,
    ``rsqrt``, the weight applied after casting back), inline when ``module`` is that class."""
    if type(module) is not cls or not _plain(module):
        return module(x)
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)  # .to(same dtype) is x itself
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return module._parameters["weight"] * (h if dtype == torch.float32 else h.to(dtype))


def _mlp(module: nn.Module, cls: type, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``: ``down(act(gate(x)) * up(x))`` inline when ``module`` is the family's MLP."""
    if type(module) is not cls or not _plain(module):
        return module(x)
    mods = module._modules
    act = mods["act_fn"]
    gate = _linear(mods["gate_proj"], x)
    gate = F.silu(gate) if type(act) is SiLUActivation and _plain(act) else act(gate)
    return _linear(mods["down_proj"], gate * _linear(mods["up_proj"], x))


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``cat(-sin[..., :half], sin[..., half:])``, so that ``_rotate`` needs no negation."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (transformers' ``apply_rotary_pos_emb``, one tensor)
    in the same bits with fewer ops: ``rotate_half(x) * sin`` is ``cat(-x2 * s1, x1 * s2)``,
    and ``-x2 * s1 == x2 * -s1`` exactly (an IEEE product's sign is the signs' xor, its
    magnitude does not depend on them), so it is ``roll(x, half) * signed_sin``."""
    return (x * cos) + (x.roll(x.shape[-1] // 2, dims=-1) * signed_sin)


def _lean_layer(layer: nn.Module, family: _Family, config: object, cache: Cache) -> bool:
    """Whether ``_decode_layer`` computes ``layer``'s forward (see the module docstring);
    ``config``: the model's, whose attention implementation ``decode_layers`` checked."""
    if type(layer) is not family.layer or not _plain(layer):
        return False
    attn = layer._modules["self_attn"]
    return (type(attn) is family.attention and _plain(attn)
            and getattr(attn, "sliding_window", None) is None
            and not (attn.training and attn.attention_dropout)
            and attn.config is config and attn.layer_idx < len(cache.layers))


def _decode_layer(layer: nn.Module, family: _Family, hidden: torch.Tensor,
                  mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  cache: Cache) -> torch.Tensor:
    """``layer``'s forward for ``hidden`` ``[batch, 1, hidden]``; ``cos``/``sin`` are the
    rotary tables already unsqueezed to ``[batch, 1, 1, head_dim]``, ``sin`` signed
    (``_signed_sin``)."""
    # submodules and parameters are read from their dicts: Module.__getattr__ costs about
    # 1.5 us a lookup on this CPU, and a layer needs some 30
    mods = layer._modules
    attn = mods["self_attn"]
    projs = attn._modules
    residual = hidden
    hidden = _norm(mods["input_layernorm"], family.norm, hidden)
    input_shape = hidden.shape[:-1]
    shape = (*input_shape, -1, attn.head_dim)
    query = _linear(projs["q_proj"], hidden).view(shape)
    key = _linear(projs["k_proj"], hidden).view(shape)
    if "q_norm" in projs:  # Qwen3: per-head RMSNorm before the rotary
        query = _norm(projs["q_norm"], family.norm, query)
        key = _norm(projs["k_norm"], family.norm, key)
    value = _linear(projs["v_proj"], hidden).view(shape).transpose(1, 2)
    query = _rotate(query.transpose(1, 2), cos, sin)
    key = _rotate(key.transpose(1, 2), cos, sin)
    key, value = cache.layers[attn.layer_idx].update(key, value)

    batch, heads, q_length, head_dim = query.shape
    groups = attn.num_key_value_groups
    if groups > 1 and use_gqa_in_sdpa(mask, key, value):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0,
                                             scale=attn.scaling, is_causal=False, enable_gqa=True)
    else:
        if groups > 1:  # one query token: its heads become the rows of each key/value head
            query = query.reshape(batch, heads // groups, groups, head_dim)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0,
                                             scale=attn.scaling, is_causal=False)
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1]).transpose(1, 2).contiguous()
    out = _linear(projs["o_proj"], out.reshape(*input_shape, -1).contiguous())
    hidden = residual + out

    residual = hidden
    hidden = _norm(mods["post_attention_layernorm"], family.norm, hidden)
    return residual + _mlp(mods["mlp"], family.mlp, hidden)


def decode_layers(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                  position_ids: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                  cache: Cache) -> torch.Tensor:
    """``hidden`` ``[batch, 1, hidden]`` through every decoder layer of ``model`` (an
    allow-listed causal LM; ``mask``: the 4-D boolean mask ``[batch, 1, 1, length]`` or None;
    ``cache``: one layer per decoder layer), as the model's layer loop computes it: lean
    layers inline (``_decode_layer``), any other layer through its own forward."""
    assert hidden.shape[1] == 1, "decode_layers feeds one token per row"
    base = model.model
    family = _family(type(model))
    config = base.config
    lean = (family is not None and type(cache).update is Cache.update
            and not getattr(cache, "offloading", False) and config._attn_implementation == "sdpa"
            and ALL_ATTENTION_FUNCTIONS.get("sdpa") is sdpa_attention_forward)
    cos, sin = position_embeddings
    cos4, sin4 = cos.unsqueeze(1), _signed_sin(sin.unsqueeze(1))  # once, not per layer
    for layer in base.layers[: config.num_hidden_layers]:
        if lean and _lean_layer(layer, family, config, cache):
            hidden = _decode_layer(layer, family, hidden, mask, cos4, sin4, cache)
        else:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache,
                           use_cache=True, position_embeddings=position_embeddings)
    return hidden
