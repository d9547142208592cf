"""Chunked token log-probs and entropy with a vocab-parallel LM head (TP > 1).

The vocab-parallel counterpart of ``trainers/logprobs.py``: each tensor-parallel rank holds
rows ``[vocab_start, vocab_start + V_r)`` of the LM-head weight and computes only its columns
of the logits, ``chunk_size`` rows at a time; the softmax statistics are combined with two
all-reduces per chunk (max; then sum-exp, ``sum exp * z`` and the label logit), so neither the
full ``[vocab, hidden]`` weight nor ``[tokens, vocab]`` logits ever exist on one rank. The
backward recomputes each chunk; the hidden-state gradient is all-reduced once over the group.
Rows of the shard at or past ``vocab_size`` (TP padding) are excluded from the softmax.
Pure ``torch.distributed``; hidden states and labels must be identical on every rank of
``group`` (megatron's replicated activations without sequence parallelism).

Log-probs follow the same definition as ``trainers/logprobs.py`` (per-row temperature, then
top-k, then top-p, the label always kept; ``areal_agents.engines.sampling.keep_threshold``).
The top-k/top-p cut-off needs the whole vocabulary, so chunks with filtering rows all-gather
their ``[chunk, vocab]`` logits once to compute it (peak memory as at TP=1); rows without
filtering never do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from areal_agents.engines.sampling import effective_temperature, keep_threshold
from areal_agents.trainers.logprobs import RowSampling, as_row_sampling


def _thresholds(z: torch.Tensor, rows: RowSampling, vocab_size: int,
                group: dist.ProcessGroup) -> torch.Tensor:
    """``[c]`` keep thresholds of one chunk from every rank's ``[c, V_r]`` scaled logits
    (padding columns ``-inf``); a collective over ``group``."""
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, z.contiguous(), group=group)
    full = torch.cat(parts, dim=1)[:, :vocab_size]
    return keep_threshold(full, rows.temperature, rows.top_k, rows.top_p)


def _dropped(z: torch.Tensor, threshold: torch.Tensor, local: torch.Tensor,
             inside: torch.Tensor) -> torch.Tensor:
    """``[c, V_r]`` bool: local columns outside the kept set (the label is always kept)."""
    drop = z < threshold[:, None]
    if drop.shape[1]:
        drop[torch.arange(len(local), device=z.device)[inside], local[inside]] = False
    return drop


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, top_k, top_p, chunk_size, vocab_start,  # type: ignore[override]
                vocab_size, group):
        n, dev = hidden.shape[0], hidden.device
        valid = max(0, min(weight.shape[0], vocab_size - vocab_start))  # real rows here
        w = weight.float()
        local = labels - vocab_start
        inside = (local >= 0) & (local < valid)
        local = local.clamp(0, max(valid - 1, 0))
        rows = RowSampling(temperature, top_k, top_p)
        temp = effective_temperature(temperature)
        threshold = torch.full((n,), float("-inf"), device=dev) if rows.filters else None
        logp, entropy, lse = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(3))
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = hidden[s:e].float() @ w.t() / temp[s:e, None]  # [c, V_r]
            z[:, valid:] = -torch.inf  # TP padding rows are not in the vocabulary
            kept = z
            if threshold is not None:
                threshold[s:e] = _thresholds(z, rows[s:e], vocab_size, group)
                kept = z.masked_fill(_dropped(z, threshold[s:e], local[s:e], inside[s:e]), -torch.inf)
            z = z[:, :valid]
            kept = kept[:, :valid]
            m = kept.max(-1).values if valid else torch.full((e - s,), -torch.inf, device=dev)
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            ez = torch.exp(kept - m[:, None])  # 0 outside the kept set
            label_z = z.gather(-1, local[s:e, None]).squeeze(-1) if valid else torch.zeros(e - s, device=dev)
            packed = torch.stack([ez.sum(-1), (ez * z).sum(-1), label_z * inside[s:e]])
            dist.all_reduce(packed, group=group)
            sum_exp, sum_ez, label_logit = packed
            lse[s:e] = m + sum_exp.log()
            logp[s:e] = label_logit - lse[s:e]
            entropy[s:e] = lse[s:e] - sum_ez / sum_exp  # H = lse - E_p[z]
        ctx.save_for_backward(hidden, weight, local, inside, temp, threshold, lse, entropy)
        ctx.set_materialize_grads(False)
        ctx.args = (chunk_size, valid, group)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):  # type: ignore[override]
        hidden, weight, local, inside, temp, threshold, lse, entropy = ctx.saved_tensors
        chunk_size, valid, group = ctx.args
        if grad_logp is None and grad_entropy is None:
            return (None,) * 10
        n, dev = hidden.shape[0], hidden.device
        w = weight[:valid].float()
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=dev)
        grad_w = torch.zeros_like(w)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = hidden[s:e].float()
            z = h @ w.t() / temp[s:e, None]
            logp_all = z - lse[s:e, None]
            p = logp_all.exp()
            if threshold is not None:  # the kept set is a constant: no gradient outside it
                p.masked_fill_(_dropped(z, threshold[s:e], local[s:e], inside[s:e]), 0.0)
            # z = logits / T:  d logp_y / dz = onehot(y) - p ;  d H / dz = -p * (log p + H)
            coef = torch.zeros(e - s, 1, device=dev)
            if grad_logp is not None:
                coef = coef + grad_logp[s:e, None].float()
            if grad_entropy is not None:
                coef = coef + grad_entropy[s:e, None].float() * (logp_all + entropy[s:e, None])
            grad_z = -p * coef
            if grad_logp is not None and valid:
                hit = grad_logp[s:e].float() * inside[s:e]
                grad_z.scatter_add_(-1, local[s:e, None], hit[:, None])
            grad_z /= temp[s:e, None]
            grad_hidden[s:e] = grad_z @ w
            grad_w += grad_z.t() @ h
        dist.all_reduce(grad_hidden, group=group)  # every rank's vocab columns contribute
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        grad_weight[:valid] = grad_w
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), *(None,) * 8)


def vocab_parallel_sequence_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: RowSampling | torch.Tensor | float,
    chunk_size: int,
    vocab_start: int,
    vocab_size: int,
    group: dist.ProcessGroup,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logprobs`` with the LM-head weight split by vocab rows over ``group``.

    Args:
        hidden: ``[B, T, h]`` final hidden states, identical on every rank of ``group``.
        weight_shard: ``[V_r, h]`` this rank's rows of the (padded) LM-head weight; every rank
            holds the same number of rows, rank r starting at ``r * V_r``.
        input_ids, attention_mask: ``[B, T]``, right padded, identical on every rank.
        sampling: per-sequence ``RowSampling`` (``[B]``), or one temperature for every row.
        vocab_start: the vocab id of ``weight_shard``'s first row.
        vocab_size: the real vocabulary size (rows at or past it are padding).

    Returns:
        ``(logprobs [B, T], entropy [B, T])`` float32, aligned as in ``areal_agents.samples``
        (position 0 and padding are 0), the same on every rank.

    Raises:
        ValueError: negative temperature or non-positive chunk size.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 (got {chunk_size})")
    b, t = input_ids.shape
    keep = attention_mask[:, 1:].bool()
    rows, labels = hidden[:, :-1][keep], input_ids[:, 1:][keep].long()
    per_row = as_row_sampling(sampling, b, hidden.device).expand(keep)
    logp, ent = _VocabParallelLogprobs.apply(
        rows, weight_shard, labels, per_row.temperature, per_row.top_k, per_row.top_p,
        chunk_size, vocab_start, vocab_size, group)
    index = keep.nonzero(as_tuple=True)
    positions = (index[0], index[1] + 1)
    out_lp = torch.zeros(b, t, dtype=torch.float32, device=hidden.device).index_put(positions, logp)
    out_ent = torch.zeros(b, t, dtype=torch.float32, device=hidden.device).index_put(positions, ent)
    return out_lp, out_ent
