"""Loss aggregation modes expressed as batch-global per-token ``loss_weights``.

A loss ``L = sum_{b,t} loss[b, t] * w[b, t]`` with weights computed once from the loss mask of
the WHOLE batch is additive over micro-batches: the share of any subset of rows is the same sum
restricted to those rows, so micro-batch losses (and their gradients) add up exactly to the
full-batch loss whatever the micro-batching.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

Aggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


def loss_weights(loss_mask: torch.Tensor, mode: Aggregation = "token-mean") -> torch.Tensor:
    """Per-token weights implementing an aggregation mode over the whole batch.

    Args:
        loss_mask: ``[B, T]`` 1 on generated tokens (any numeric dtype).
        mode: with ``m`` the mask, ``n_b = sum_t m[b, t]``, ``N = sum_b n_b`` and ``S`` the number
            of rows with ``n_b > 0``:

            * ``"token-mean"``: ``w = m / N`` (every generated token counts equally; DAPO).
            * ``"seq-mean-token-sum"``: ``w = m / S`` (sum over a sequence's tokens, mean over
              sequences; no length normalisation, Dr.GRPO).
            * ``"seq-mean-token-mean"``: ``w = m / (n_b * S)`` (mean per sequence, then mean
              over sequences; the original GRPO).

    Returns:
        ``[B, T]`` float weights (float32 unless the mask is float64); zero where the mask is 0.
        An all-zero mask gives all-zero weights (losses become 0, never NaN).

    Raises:
        ValueError: unknown ``mode``, or ``loss_mask`` is not 2-D.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [batch, seq], got shape {tuple(loss_mask.shape)}")
    dtype = loss_mask.dtype if loss_mask.dtype == torch.float64 else torch.float32
    m = (loss_mask != 0).to(dtype)  # [B, T]
    n_tok = m.sum(-1)  # [B]
    if mode == "token-mean":
        return m / n_tok.sum().clamp(min=1)
    num_seqs = (n_tok > 0).sum().clamp(min=1).to(dtype)
    if mode == "seq-mean-token-sum":
        return m / num_seqs
    return m / (n_tok.clamp(min=1)[:, None] * num_seqs)


def weighted_sum(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(values * weights)`` over all positions: the aggregated value (a 0-d tensor).

    Args:
        values: ``[B, T]`` per-token values (a loss or a statistic).
        weights: ``[B, T]`` from :func:`loss_weights` (zero off the mask).

    Positions with zero weight are excluded even if ``values`` is inf/NaN there.
    """
    return torch.where(weights != 0, values * weights, torch.zeros_like(values)).sum()
