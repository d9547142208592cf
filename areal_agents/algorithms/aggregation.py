"""Loss aggregation modes expressed as batch-global per-token ``loss_weights``.

A loss ``L = sum_{b,t} loss[b, t] * w[b, t]`` with weights computed once from the loss mask of
the WHOLE batch is additive over micro-batches: the share of any subset of rows is the same sum
restricted to those rows, so micro-batch losses (and their gradients) add up exactly to the
full-batch loss whatever the micro-batching. Logged statistics use :func:`stat_weights` (the
token-mean weights) whatever the aggregation, so a clip fraction always reads as a fraction.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

Aggregation = Literal[
    "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


def loss_weights(
    loss_mask: torch.Tensor, mode: Aggregation = "token-mean", norm_len: int | None = None
) -> torch.Tensor:
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
            * ``"seq-mean-token-sum-norm"``: ``w = m / (S * L)`` with a constant ``L``
              (Dr.GRPO's normaliser ``1 / (G * MAX_TOKENS)``): token sums scaled by one
              length-independent constant.
        norm_len: ``L`` of ``"seq-mean-token-sum-norm"`` (ignored by the other modes). ``None``
            uses the batch's longest generated row, ``max_b n_b``, which changes from batch to
            batch; pass the generation budget (e.g. ``max_tokens``) for Dr.GRPO's constant.

    Returns:
        ``[B, T]`` float weights (float32 unless the mask is float64); zero where the mask is 0.
        An all-zero mask gives all-zero weights (losses become 0, never NaN).

    Raises:
        ValueError: unknown ``mode``, ``loss_mask`` is not 2-D, or ``norm_len < 1``.

    Example:
        >>> m = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0]])
        >>> loss_weights(m, "seq-mean-token-sum-norm", norm_len=4)[:, :2]
        tensor([[0.0000, 0.1250],
                [0.1250, 0.0000]])
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
    if mode == "seq-mean-token-sum-norm":
        if norm_len is not None and norm_len < 1:
            raise ValueError(f"norm_len must be >= 1 (or None: the longest row), got {norm_len}")
        length = n_tok.max().clamp(min=1) if norm_len is None else torch.tensor(float(norm_len))
        return m / (num_seqs * length.to(dtype))
    return m / (n_tok.clamp(min=1)[:, None] * num_seqs)


def stat_weights(loss_mask: torch.Tensor) -> torch.Tensor:
    """Batch-global token-mean weights ``m / N`` for logged statistics (``TokenBatch.
    stat_weights``): ``sum(x * w)`` is the plain per-token mean of ``x`` over the batch, and the
    micro-batch sums add up to it, whatever the loss aggregation.

    Raises:
        ValueError: ``loss_mask`` is not 2-D.
    """
    return loss_weights(loss_mask, "token-mean")


def weighted_sum(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(values * weights)`` over all positions: the aggregated value (a 0-d tensor).

    Args:
        values: ``[B, T]`` per-token values (a loss or a statistic).
        weights: ``[B, T]`` from :func:`loss_weights` (zero off the mask).

    Positions with zero weight are excluded even if ``values`` is inf/NaN there.
    """
    return torch.where(weights != 0, values * weights, torch.zeros_like(values)).sum()
