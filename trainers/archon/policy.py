"""``ArchonPolicyModule``: an Archon backbone plus the shared chunked LM-head log-probs in one
forward, with the padding-free (packed) path; ``build_model`` for every supported model source."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from areal_agents.trainers.lm_head import head_operands
from areal_agents.trainers.logprobs import DEFAULT_CHUNK_SIZE, RowSampling, sequence_logprobs
from areal_agents.trainers.shared_prefix import PrefixPlan, assemble_hidden, suffix_attention_mask

from .models import ModelArgs, Transformer, from_hf, relayout
from .models.qwen3 import Packing, PromptKV


class ArchonPolicyModule(nn.Module):
    """Runs the Archon backbone and the chunked LM-head log-probs in one forward (so the FSDP
    root unshards the head weight exactly while it is used). Returns ``(logprobs, entropy)``
    ``[B, T]`` aligned with ``input_ids``, under each sequence's sampling distribution
    (``sampling``: ``RowSampling.of(batch)``, or one temperature; ``trainers/logprobs.py``).

    With ``pack`` the backbone runs on the real tokens only (``[n, dim]``, no padding rows in
    the matmuls, norms and MLPs); attention scatters them to ``[B, T]`` for the causal SDPA.
    """

    def __init__(self, model: Transformer, chunk_size: int = DEFAULT_CHUNK_SIZE, pack: bool = True) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.pack = pack

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                sampling: RowSampling | float = 1.0,
                positions: torch.Tensor | None = None,
                prefix_plan: PrefixPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if prefix_plan is not None:  # each shared prompt once (trainers/shared_prefix.py)
            h = model.norm(_shared_backbone(model, prefix_plan, input_ids.shape[1]))
        elif self.pack:
            h = _packed_backbone(model, input_ids, attention_mask)
        else:
            h = model.norm(_backbone(model, input_ids))
        h, weight = head_operands(model.output, h)  # a replicated head: its local copy
        return sequence_logprobs(h, weight, input_ids, attention_mask, sampling, self.chunk_size,
                                 positions)


def _backbone(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states ``[B, T, dim]`` after the last block (before the final norm)."""
    h = model.tok_embeddings(tokens)
    cos, sin = model.rope_table(h.shape[1], h.dtype)
    cos, sin = cos[: h.shape[1]], sin[: h.shape[1]]
    for layer in model.layers.values():
        h = layer(h, cos, sin)
    return h


def _shared_backbone(model: Transformer, plan: PrefixPlan, width: int) -> torch.Tensor:
    """Hidden states ``[B, width, dim]`` after the last block (zeros at padding), each group's
    prompt run once: a prompt pass recording every layer's keys/values (``PromptKV``), then
    every row's remainder at its own positions on top of its group's."""
    kv = PromptKV()
    h = model.tok_embeddings(plan.prefix_ids)  # [G, P, dim]
    longest, suffix = plan.prefix_ids.shape[1], plan.suffix_ids.shape[1]
    cos, sin = model.rope_table(int(plan.prefix_len.max()) + suffix, h.dtype)
    for layer in model.layers.values():
        h = layer(h, cos[:longest], sin[:longest], None, kv)
    kv.extend(plan.group_of_row, suffix_attention_mask(plan))
    positions = plan.prefix_len[:, None] + torch.arange(suffix, device=h.device)  # [B, S]
    hs = model.tok_embeddings(plan.suffix_ids)
    for layer in model.layers.values():
        hs = layer(hs, cos[positions], sin[positions], None, kv)
    return assemble_hidden(plan, h, hs, width)


def _packed_backbone(model: Transformer, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states ``[B, T, dim]`` (zeros at padding) computed on the real
    tokens only."""
    packing = Packing.from_mask(attention_mask)
    h = model.tok_embeddings(tokens.reshape(-1).index_select(0, packing.index))  # [n, dim]
    cos, sin = model.rope_table(packing.seqlen, h.dtype)
    pos = packing.positions()
    cos, sin = cos[pos], sin[pos]
    for layer in model.layers.values():
        h = layer(h, cos, sin, packing)
    return packing.unpack(model.norm(h))


def build_model(source: Transformer | ModelArgs | nn.Module | str, seed: int = 0,
                fused: bool = True) -> Transformer:
    """An Archon ``Transformer`` from itself, ``ModelArgs`` (random init with ``seed``), a
    ``transformers`` model or a HF checkpoint directory, with fused (``wqkv``/``w13``) or
    unfused projections as ``fused`` asks (weights are converted when needed)."""
    if isinstance(source, Transformer):
        return relayout(source, fused)
    if isinstance(source, ModelArgs):
        model = Transformer(replace(source, fused_projections=fused))
        model.init_weights(seed=seed)
        return model
    return from_hf(source, fused=fused)
