"""The dense Archon decoder: Qwen3 (q/k norm), Qwen2 (q/k/v bias) and Llama-3 (RoPE scaling).

Plain PyTorch with no parallelism inside: sharding, pipelining and LoRA are applied from
``trainers/archon/parallelize.py``, ``pipeline.py`` and ``lora.py``. Layers live in an
``nn.ModuleDict`` keyed by the global layer index so pipeline stages keep their names, and
``tok_embeddings`` / ``norm`` / ``output`` may be ``None`` on middle pipeline stages.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (same numerics as the HF reference)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse RoPE frequencies ``[head_dim // 2]``, with Llama-3 scaling when configured."""
    dim = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = args.rope_scaling
    if not sc:
        return inv
    factor, low, high = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_len = float(sc["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[seq, 1, head_dim]`` for positions ``0..seq_len-1`` (they
    broadcast over the heads of ``[..., seq, heads, head_dim]`` activations)."""
    pos = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., tokens, heads, head_dim]`` by ``cos/sin`` ``[tokens, 1, head_dim]``."""
    return x * cos + _rotate_half(x) * sin


class Packing(NamedTuple):
    """Where the real tokens of a right-padded ``[batch, seqlen]`` batch sit: ``index`` ``[n]``
    flat positions (``row * seqlen + col``). Packed activations are ``[n, dim]``; only attention
    scatters them back to ``[batch, seqlen, ...]`` (the causal mask then keeps each sequence's
    tokens apart and off the padding)."""

    index: torch.Tensor
    batch: int
    seqlen: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Packing:
        b, t = attention_mask.shape
        return cls(attention_mask.reshape(-1).nonzero().squeeze(1), b, t)

    def positions(self) -> torch.Tensor:
        """``[n]`` position of each packed token inside its sequence."""
        return self.index % self.seqlen

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, *rest]`` -> ``[batch, seqlen, *rest]`` with zeros at padded positions."""
        full = x.new_zeros(self.batch * self.seqlen, *x.shape[1:]).index_copy(0, self.index, x)
        return full.view(self.batch, self.seqlen, *x.shape[1:])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, seqlen, *rest]`` -> ``[n, *rest]`` (the real tokens)."""
        return x.reshape(self.batch * self.seqlen, *x.shape[2:]).index_select(0, self.index)


class PromptKV:
    """Keys and values handed from a shared-prompt pass to the remainder pass
    (``trainers/shared_prefix.py``). Passed to every block: while ``rows`` is ``None`` each
    attention appends its post-RoPE ``(k, v)`` ``[G, kv_heads, P, head_dim]`` and attends
    causally; after ``extend`` each prepends its layer's pair, gathered by ``rows`` (each
    row's group), and attends under ``mask`` ``[B, 1, S, P + S]``. Gradients flow through
    the gathered keys and values into the prompt pass."""

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rows: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self._next = 0

    def extend(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Switch to the remainder pass: ``rows`` ``[B]`` group of each row, ``mask``
        ``[B, 1, S, P + S]`` bool."""
        self.rows, self.mask, self._next = rows, mask, 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA over ``[b, heads, t, head_dim]`` q/k/v, recording or prepending the prompt's."""
        if self.rows is None:
            self.layers.append((k, v))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        past_k, past_v = self.layers[self._next]
        self._next += 1
        k = torch.cat([past_k[self.rows], k], dim=2)
        v = torch.cat([past_v[self.rows], v], dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)


class Attention(nn.Module):
    """Grouped-query causal self-attention. Head counts are inferred from the (possibly
    tensor-parallel, hence local) projection widths, so TP needs no change here.

    With ``args.fused_projections`` q, k and v come from one ``wqkv`` matmul (rows
    ``[q; k; v]``); otherwise from ``wq``/``wk``/``wv`` (the layout tensor parallelism and LoRA
    use). The HF converters split and merge the fused weight.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.fused = args.fused_projections
        if self.fused:
            self.wqkv = nn.Linear(args.dim, q_out + 2 * kv_out, bias=args.qkv_bias)
            self.split = (q_out, kv_out, kv_out)
        else:
            self.wq = nn.Linear(args.dim, q_out, bias=args.qkv_bias)
            self.wk = nn.Linear(args.dim, kv_out, bias=args.qkv_bias)
            self.wv = nn.Linear(args.dim, kv_out, bias=args.qkv_bias)
        self.wo = nn.Linear(q_out, args.dim, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                packing: Packing | None = None, kv: PromptKV | None = None) -> torch.Tensor:
        """``x`` ``[b, t, dim]`` (``cos/sin`` ``[t, 1, head_dim]``, or ``[b, t, 1, head_dim]``
        per row) or packed ``[n, dim]`` (``cos/sin`` ``[n, 1, head_dim]``, ``packing``
        given); returns the same layout. ``kv``: a shared-prompt pass (unpacked only)."""
        if self.fused:
            q, k, v = self.wqkv(x).split(self.split, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k, v = (z.unflatten(-1, (-1, self.head_dim)) for z in (q, k, v))  # [..., heads, hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if packing is not None:
            q, k, v = packing.unpack(q), packing.unpack(k), packing.unpack(v)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [b, heads, t, head_dim]
        if kv is not None:
            out = kv.attend(q, k, v)
        else:
            # Right-padded batches only: a causal mask already keeps real tokens off the padding.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = out.transpose(1, 2)  # [b, t, heads, head_dim]
        out = packing.pack(out) if packing is not None else out
        return self.wo(out.flatten(-2))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)`` (HF gate/down/up). With ``fused`` one ``w13``
    matmul gives ``[gate; up]`` (rows ``[w1; w3]``)."""

    def __init__(self, dim: int, hidden_dim: int, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
            self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        else:
            self.w1 = nn.Linear(dim, hidden_dim, bias=False)
            self.w2 = nn.Linear(hidden_dim, dim, bias=False)
            self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe_enabled = args.layer_is_moe(layer_id)
        if self.moe_enabled:
            from .qwen3_moe import MoE

            self.feed_forward: nn.Module = MoE(args)
        else:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim, args.fused_projections)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                packing: Packing | None = None, kv: PromptKV | None = None) -> torch.Tensor:
        rest = (cos, sin) if packing is None else (cos, sin, packing)  # TP input plans count args
        if kv is not None:  # a shared-prompt pass (never under TP)
            rest = (cos, sin, None, kv)
        h = x + self.attention(self.attention_norm(x), *rest)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(tokens [b, t] long) -> logits [b, t, vocab]``.

    On a pipeline stage without ``tok_embeddings`` the input is hidden states ``[b, t, dim]``;
    without ``output`` the result is hidden states. With ``tie_embeddings`` the output
    projection shares the embedding weight.

    Example:
        >>> m = Transformer(ModelArgs(vocab_size=32, dim=16, n_heads=2, n_kv_heads=1, head_dim=8))
        >>> m(torch.zeros(1, 5, dtype=torch.long)).shape
        torch.Size([1, 5, 32])
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        cos, sin = self.rope_table(h.shape[1], h.dtype)
        cos, sin = cos[: h.shape[1]], sin[: h.shape[1]]
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def rope_table(self, seqlen: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``[>= seqlen, 1, head_dim]`` computed once and cached (regrown only for
        a longer sequence; the same values as ``rope_cos_sin``). Index it by position."""
        table = self._rope_table
        if (table is None or table[0].shape[0] < seqlen or table[0].dtype != dtype
                or table[0].device != self.inv_freq.device):
            n = max(seqlen, min(self.args.max_seq_len, 4096))
            table = self._rope_table = rope_cos_sin(self.inv_freq, n, dtype)
        return table

    def aux_loss(self) -> torch.Tensor | None:
        """Load-balancing loss of the last forward, pooled over MoE layers (``None`` when dense)."""
        logits = [m.feed_forward.last_router_logits for m in self.layers.values()
                  if getattr(m, "moe_enabled", False) and m.feed_forward.last_router_logits is not None]
        if not logits:
            return None
        from .qwen3_moe import load_balancing_loss

        return load_balancing_loss(logits, self.args.num_experts, self.args.top_k)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Normal(0, std) weights, zero biases, unit norms (deterministic with ``seed``).

        Values are drawn in the unfused layout's order and then fused, so a seed gives the
        same model whether or not ``args.fused_projections`` is set."""
        from dataclasses import replace

        from .layout import fuse_state

        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.device("meta"):
            ref = Transformer(replace(self.args, fused_projections=False))
        state = {}
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                state[name] = torch.ones(p.shape)
            elif name.endswith("bias"):
                state[name] = torch.zeros(p.shape)
            else:
                state[name] = torch.randn(p.shape, generator=gen) * std
        if self.args.tie_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        state = fuse_state(state) if self.args.fused_projections else state
        own = dict(self.named_parameters(remove_duplicate=False))
        for name, value in state.items():
            if name in own:
                own[name].copy_(value)
