"""Chunked token log-probs and entropy from hidden states and the LM head (shared by backends).

The full ``[tokens, vocab]`` log-softmax is never materialised: logits are computed
``chunk_size`` rows at a time, reduced to one log-prob and one entropy per row, and recomputed
chunk by chunk in the backward pass (a custom autograd function). Temperature is applied exactly
as the inference engines apply it: ``log_softmax(logits / T)``, in float32.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 1024


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """``hidden @ weight.T / temperature`` in float32 (``[n, V]``)."""
    logits = hidden.float() @ weight.float().t()
    if temperature != 1.0:
        logits /= temperature
    return logits


def _chunk_stats(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logsumexp [n], logp_label [n], entropy [n])`` for one chunk, in float32."""
    logp_all = _chunk_logits(hidden, weight, temperature)
    lse = torch.logsumexp(logp_all, dim=-1)
    logp_all -= lse[:, None]  # in place: log-softmax without another [n, V] buffer
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -torch.linalg.vecdot(logp_all.exp(), logp_all)  # fused multiply-sum
    return lse, logp, entropy


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward and backward of ``(logp, entropy)`` chunk by chunk; see ``chunked_logprobs``."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size):  # type: ignore[override]
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            lse[s:e], logp[s:e], entropy[s:e] = _chunk_stats(hidden[s:e], weight, labels[s:e], temperature)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.set_materialize_grads(False)  # an unused output (often entropy) costs nothing
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):  # type: ignore[override]
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        t, n = ctx.temperature, hidden.shape[0]
        w32 = weight.float()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        want_w = ctx.needs_input_grad[1]
        grad_weight = None
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            with torch.no_grad():
                logp_all = _chunk_logits(hidden[s:e], w32, t)
                logp_all -= lse[s:e, None]  # the forward's log-normaliser: no softmax again
                p = logp_all.exp()
                # z = logits / T:  d logp_y / dz = onehot(y) - p ;  d H / dz = -p * (log p + H)
                coef = torch.zeros(e - s, 1, device=hidden.device)
                if grad_logp is not None:
                    coef = coef + grad_logp[s:e, None].float()
                if grad_entropy is not None:
                    ent = entropy[s:e, None]
                    g_ent = grad_entropy[s:e, None].float()
                    logp_all.add_(ent).mul_(g_ent).add_(coef)  # g_lp + g_H * (log p + H)
                    grad_z = logp_all.mul_(p).neg_()
                else:
                    grad_z = p.mul_(-coef)
                if grad_logp is not None:
                    grad_z.scatter_add_(-1, labels[s:e, None], grad_logp[s:e, None].float())
                if t != 1.0:
                    grad_z /= t
                del p
                if grad_hidden is not None:
                    grad_hidden[s:e] = (grad_z @ w32).to(hidden.dtype)
                if want_w and grad_weight is None:
                    grad_weight = grad_z.t() @ hidden[s:e].float()
                elif want_w:
                    grad_weight.addmm_(grad_z.t(), hidden[s:e].float())
        if want_w:
            grad_weight = torch.zeros_like(w32) if grad_weight is None else grad_weight
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and entropy under ``log_softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden: ``[n, hidden]`` final hidden states (any float dtype).
        weight: ``[vocab, hidden]`` LM-head weight (no bias).
        labels: ``[n]`` long, the token each row predicts.
        temperature: the sampling temperature (> 0).
        chunk_size: rows per chunk; peak extra memory is ``O(chunk_size * vocab)``.

    Returns:
        ``(logprobs [n], entropy [n])`` in float32, differentiable w.r.t. ``hidden`` and
        ``weight``.

    Raises:
        ValueError: non-positive temperature or chunk size, or mismatched shapes.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); greedy has no log-probs")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 (got {chunk_size})")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)} must be [n, h], labels "
            f"{tuple(labels.shape)} [n], weight {tuple(weight.shape)} [vocab, h]"
        )
    return _ChunkedLogprobs.apply(hidden, weight, labels.long(), float(temperature), chunk_size)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropy aligned with ``input_ids`` (``areal_agents.samples``).

    ``out[b, t]`` is log p(input_ids[b, t] | input_ids[b, :t]); position 0 and padded positions
    are 0. Only real tokens are pushed through the LM head.

    Args:
        hidden: ``[B, T, h]`` final hidden states.
        weight: ``[vocab, h]`` LM-head weight.
        input_ids: ``[B, T]`` long.
        attention_mask: ``[B, T]`` bool/int, right padded.

    Returns:
        ``(logprobs [B, T], entropy [B, T])`` float32.
    """
    b, t = input_ids.shape
    keep = attention_mask[:, 1:].bool()  # [B, T-1]: positions 1.. that are real tokens
    rows = hidden[:, :-1][keep]  # [n, h]
    labels = input_ids[:, 1:][keep]
    logp, ent = chunked_logprobs(rows, weight, labels, temperature, chunk_size)
    out_lp = torch.zeros(b, t, dtype=torch.float32, device=hidden.device)
    out_ent = torch.zeros(b, t, dtype=torch.float32, device=hidden.device)
    index = keep.nonzero(as_tuple=True)
    out_lp = out_lp.index_put((index[0], index[1] + 1), logp)
    out_ent = out_ent.index_put((index[0], index[1] + 1), ent)
    return out_lp, out_ent


def full_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (unchunked) version of ``sequence_logprobs`` from ``[B, T, vocab]`` logits."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)[:, :-1]
    lp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    mask = attention_mask[:, 1:].float()
    zero = torch.zeros_like(input_ids[:, :1], dtype=torch.float32)
    return torch.cat([zero, lp * mask], 1), torch.cat([zero, ent * mask], 1)
