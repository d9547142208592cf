"""Token-budget micro-batching (shared by backends): group sequences by length under a budget.

A micro-batch's cost is its *padded* size ``rows * longest``. Sequences are sorted by length
(longest first) and packed greedily while ``rows * longest <= token_budget``; since neighbours
have similar lengths the padding waste stays small, and no micro-batch exceeds the budget unless
one sequence alone is longer than it (it then gets a micro-batch of its own).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from areal_agents.samples import TokenBatch


def plan_microbatches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of each micro-batch.

    Args:
        lengths: real length of each sequence.
        token_budget: maximum padded tokens (``rows * longest``) per micro-batch.

    Returns:
        Lists of indices into ``lengths`` covering each index exactly once; micro-batches and
        the indices inside each are ordered longest first (ties by index).

    Example:
        >>> plan_microbatches([5, 17, 3, 9], token_budget=20)
        [[1], [3, 0], [2]]

    Raises:
        ValueError: ``token_budget`` < 1.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1 (got {token_budget})")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    plans: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        if current and (len(current) + 1) * max(longest, n) > token_budget:
            plans.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        plans.append(current)
    return plans


def split_batch(batch: TokenBatch, token_budget: int) -> list[TokenBatch]:
    """``batch`` as token-budget micro-batches (each trimmed to its own longest sequence)."""
    lengths = batch.attention_mask.sum(-1).tolist()
    return [batch.select(torch.tensor(idx)) for idx in plan_microbatches(lengths, token_budget)]


def padding_waste(lengths: Sequence[int], plans: Sequence[Sequence[int]]) -> float:
    """Fraction of padded tokens over all micro-batches (0 = no padding)."""
    padded = sum(len(p) * max(int(lengths[i]) for i in p) for p in plans if p)
    real = sum(int(x) for x in lengths)
    return 0.0 if padded == 0 else 1.0 - real / padded
