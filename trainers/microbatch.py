"""Token-budget micro-batching (shared by backends): group sequences by length under a budget.

A micro-batch's cost is its *padded* size ``rows * longest``. Sequences are sorted by length
(longest first) and packed greedily while ``rows * longest <= token_budget``; since neighbours
have similar lengths the padding waste stays small, and no micro-batch exceeds the budget unless
one sequence alone is longer than it (it then gets a micro-batch of its own).

With ``prompts`` (the engine shares prompts, ``trainers/shared_prefix.py``) rows are planned
by prompt group instead: a group's rows stay in one micro-batch where the budget allows, and a
micro-batch costs what its shared forward runs (``shared_cost``: each distinct prompt once
plus every row's remainder, padded), so a group is never split over micro-batches that would
each recompute its prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from areal_agents.samples import TokenBatch
from areal_agents.trainers.shared_prefix import RowPrompts, shares_enough


def plan_microbatches(lengths: Sequence[int], token_budget: int,
                      prompts: RowPrompts | None = None) -> list[list[int]]:
    """Indices of each micro-batch.

    Args:
        lengths: real length of each sequence.
        token_budget: maximum padded tokens (``rows * longest``) per micro-batch; with
            ``prompts``, maximum ``shared_cost``.
        prompts: each row's prompt group and length (``shared_prefix.row_prompts``), when
            the engine shares prompts: whole groups are packed (``plan_grouped``) when some
            group has several rows (else the plan by length).

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
    if prompts is not None and len(set(prompts.group)) < len(prompts.group):
        return plan_grouped(lengths, token_budget, prompts)  # some prompt is shared
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


class _Pack:
    """Running totals of a set of rows, enough to cost it (``shared_cost``) in O(groups)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.longest = 1
        self.longest_rest = 1
        self.real = 0
        self.prompt_lengths: list[int] = []
        self.groups: dict[int, int] = {}  # group -> prompt length

    def add(self, row: int, length: int, group: int, prompt: int) -> None:
        self.rows.append(row)
        self.longest = max(self.longest, length)
        self.longest_rest = max(self.longest_rest, length - prompt)
        self.real += length
        self.prompt_lengths.append(prompt)
        self.groups[group] = prompt

    def merged(self, other: _Pack) -> _Pack:
        out = _Pack()
        out.rows = self.rows + other.rows
        out.longest = max(self.longest, other.longest)
        out.longest_rest = max(self.longest_rest, other.longest_rest)
        out.real = self.real + other.real
        out.prompt_lengths = self.prompt_lengths + other.prompt_lengths
        out.groups = {**self.groups, **other.groups}
        return out

    def cost(self) -> int:
        plain = len(self.rows) * self.longest
        if not shares_enough(self.prompt_lengths, sum(self.groups.values()), self.real):
            return plain
        return len(self.groups) * max(self.groups.values()) + len(self.rows) * self.longest_rest


def shared_cost(lengths: Sequence[int], prompts: RowPrompts, rows: Sequence[int]) -> int:
    """Padded tokens the forward of micro-batch ``rows`` runs: with enough sharing
    (``shares_enough``, the engine's rule) ``groups * longest prompt + rows * longest
    remainder`` (the prompt pass and the remainder pass), else ``rows * longest``.

    Example:
        >>> shared_cost([7, 6, 9], RowPrompts([0, 0, 1], [5, 5, 6]), [0, 1])  # 5 + 2 * 2
        9
        >>> shared_cost([7, 6, 9], RowPrompts([0, 0, 1], [5, 5, 6]), [0, 2])  # no sharing
        18
    """
    return _pack(lengths, prompts, rows).cost()


def _pack(lengths: Sequence[int], prompts: RowPrompts, rows: Sequence[int]) -> _Pack:
    pack = _Pack()
    for r in rows:
        pack.add(r, max(int(lengths[r]), 1), prompts.group[r], prompts.length[r])
    return pack


def plan_grouped(lengths: Sequence[int], token_budget: int,
                 prompts: RowPrompts) -> list[list[int]]:
    """``plan_microbatches`` by prompt group: each group's rows (longest first) form one unit,
    split into consecutive chunks only where the whole group exceeds ``token_budget``; units
    are placed longest first into the first micro-batch whose ``shared_cost`` stays within the
    budget (first-fit decreasing), else a new one. A unit over the budget alone (one row
    longer than it) gets a micro-batch of its own.

    Example:
        >>> lengths = [9, 9, 8, 8, 8]  # two prompts: rows 0, 2, 4 (6 tokens) and 1, 3 (5)
        >>> plan_grouped(lengths, 20, RowPrompts([0, 1, 0, 1, 0], [6, 5, 6, 5, 6]))
        [[0, 2, 4], [1, 3]]
    """
    by_group: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        by_group.setdefault(prompts.group[i], []).append(i)
    units: list[_Pack] = []
    for rows in by_group.values():
        unit = _Pack()
        for r in rows:
            bigger = unit.merged(_pack(lengths, prompts, [r]))
            if unit.rows and bigger.cost() > token_budget:
                units.append(unit)
                bigger = _pack(lengths, prompts, [r])
            unit = bigger
        units.append(unit)
    units.sort(key=lambda u: (-u.longest, u.rows[0]))
    packs: list[_Pack] = []
    for unit in units:
        for k, pack in enumerate(packs):
            bigger = pack.merged(unit)
            if bigger.cost() <= token_budget:
                packs[k] = bigger
                break
        else:
            packs.append(unit)
    return [sorted(p.rows, key=lambda i: (-int(lengths[i]), i)) for p in packs]


def split_batch(batch: TokenBatch, token_budget: int) -> list[TokenBatch]:
    """``batch`` as token-budget micro-batches (each trimmed to its own longest sequence)."""
    lengths = batch.attention_mask.sum(-1).tolist()
    return [batch.select(torch.tensor(idx)) for idx in plan_microbatches(lengths, token_budget)]


def padding_waste(lengths: Sequence[int], plans: Sequence[Sequence[int]]) -> float:
    """Fraction of padded tokens over all micro-batches (0 = no padding)."""
    padded = sum(len(p) * max(int(lengths[i]) for i in p) for p in plans if p)
    real = sum(int(x) for x in lengths)
    return 0.0 if padded == 0 else 1.0 - real / padded
