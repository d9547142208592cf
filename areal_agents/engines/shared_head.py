"""Shared prompt heads: distinct prompts that join a batch together and begin with the same
tokens (a task's instruction before each question) prefill that head once.

``plan_heads`` groups prompts by their first ``min_tokens`` tokens; a group of two or more
shares its longest common prefix, the *head* (at most every prompt's length minus one: a
prompt's last token is always computed, it yields the first logits). ``prefill_shared_heads``
computes the head's keys/values once (one row) and then each prompt's rest on top of them in
one batch (``scheduler.prefill_cached``, whose rows all compute the same number of tokens: a
prompt shorter than the group's longest takes fewer head tokens and recomputes the others).
Prompts in no group are prefilled whole, as before.

The keys/values of the head equal those a full prefill computes up to float32 rounding (a
matmul of other shapes), so log-probs move by ~1e-7, like a change of batch composition: token
ids do not change unless a sampled token sat on a rounding tie. ``LocalEngine`` does this only
when built with ``shared_head_tokens > 0``.

Example:
    >>> instruction = list(range(100, 120))
    >>> plans, plain = plan_heads([instruction + [1, 2], instruction + [3], [7, 8, 9]],
    ...                           min_tokens=16, budget=8192)
    >>> [(len(p.head), p.members, p.reuse, p.width) for p in plans], plain
    ([(20, [0, 1], [20, 19], 2)], [2])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .scheduler import prefill, prefill_cached

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

    from .base import GenerateRequest
    from .prefix_cache import PrefillCounts

    # ``scheduler.prefill``'s (cache, mask, positions, logits)
    Prefilled = tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]

__all__ = ["HeadPlan", "common_prefix", "plan_heads", "prefill_shared_heads"]


@dataclass(frozen=True)
class HeadPlan:
    """One batch of prompts prefilled after a shared head.

    Attributes:
        head: the shared first tokens (their keys/values computed once, one row).
        members: indices of the prompts (in ``plan_heads``' input) of this batch.
        reuse: per member, how many head tokens it takes (``len(prompt) - width``, in
            ``[1, len(head)]``).
        width: tokens each member computes after its ``reuse`` (the same for all).
    """

    head: tuple[int, ...]
    members: list[int]
    reuse: list[int]
    width: int


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """The length of the longest prefix every one of ``prompts`` starts with.

    Example:
        >>> common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]])
        2
    """
    first, n = prompts[0], min(len(p) for p in prompts)
    for i in range(n):
        if any(p[i] != first[i] for p in prompts):
            return i
    return n


def plan_heads(prompts: Sequence[Sequence[int]], min_tokens: int,
               budget: int) -> tuple[list[HeadPlan], list[int]]:
    """Which of ``prompts`` (distinct prompt ids) prefill after a shared head.

    Args:
        prompts: the distinct prompts joining in one step (one adapter).
        min_tokens: the shortest head worth sharing (>= 1).
        budget: prompt tokens one prefill batch holds at most (members x longest prompt).

    Returns:
        ``(plans, plain)``: the head batches, and the indices of the prompts to prefill whole.

    Raises:
        ValueError: ``min_tokens < 1``.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    groups: dict[tuple[int, ...], list[int]] = {}
    plain: list[int] = []
    for i, prompt in enumerate(prompts):
        if len(prompt) > min_tokens:
            groups.setdefault(tuple(prompt[:min_tokens]), []).append(i)
        else:
            plain.append(i)
    plans: list[HeadPlan] = []
    for members in groups.values():
        if len(members) < 2:
            plain += members
            continue
        group_plans, rest = _group_plans([prompts[i] for i in members], members, budget)
        plans += group_plans
        plain += rest
    return plans, sorted(plain)


def _group_plans(group: list[Sequence[int]], members: list[int],
                 budget: int) -> tuple[list[HeadPlan], list[int]]:
    """A group's head batches: its common prefix (capped one short of the shortest prompt),
    members in batches of at most ``budget`` tokens; a member too short to take a head token
    at its batch's width (the longest member's rest) is left to a plain prefill, and so is
    the whole group when fewer than two members would take the head."""
    length = min(common_prefix(group), min(len(p) for p in group) - 1)
    head = tuple(group[0][:length])
    per_batch = max(1, budget // max(len(p) for p in group))
    plans, plain = [], []
    for start in range(0, len(members), per_batch):
        batch = list(range(start, min(start + per_batch, len(members))))
        width = max(len(group[b]) for b in batch) - length
        kept = [b for b in batch if len(group[b]) - width >= 1]  # the longest always is
        plain += [members[b] for b in batch if b not in kept]
        plans.append(HeadPlan(head, [members[b] for b in kept],
                              [len(group[b]) - width for b in kept], width))
    if sum(len(plan.members) for plan in plans) < 2:  # a head no other prompt shares
        return [], members
    return plans, plain


def prefill_shared_heads(
        model: torch.nn.Module, device: torch.device, groups: Sequence[Sequence[GenerateRequest]],
        min_tokens: int, budget: int, counts: PrefillCounts,
        rows: Callable[[list[str | None]], AbstractContextManager[object]],
        join: Callable[[list[int], Prefilled], None]) -> set[int]:
    """Prefill the distinct prompts of ``groups`` that begin with a shared head: each head once
    (one row), then every member's rest after it in one batch per ``plan_heads`` plan.

    Args:
        model: the engine's causal LM.
        device: the device of ``model``.
        groups: the requests joining in one step, gathered by identical (adapter, prompt ids)
            in order of first arrival; a group is one distinct prompt (its first request's),
            prefilled once for all its requests' ``sampling.n`` rows. Heads are planned per
            adapter (a head's keys/values are its adapter's).
        min_tokens: the shortest head worth sharing (``LocalEngine.shared_head_tokens``, >= 1).
        budget: prompt tokens one prefill batch holds at most (members x longest prompt).
        counts: updated in place: ``computed`` (each head once, each member's rest), ``head``
            (head tokens members took instead of computing), ``shared`` (the prompt tokens of
            a group's requests after its first).
        rows: ``rows(adapters)`` is the context in which row ``i`` of a forward uses adapter
            ``adapters[i]`` (None: the base), as ``LocalEngine._rows``.
        join: called once per plan, in order, with the indices of the groups prefilled and
            ``scheduler.prefill_cached``'s result, whose rows are those groups' requests' rows,
            group by group, request by request (``n`` each): the caller samples their first
            tokens and adds them to its batch.

    Returns:
        The indices of the ``groups`` prefilled here; the others are left to a plain prefill.
    """
    by_adapter: dict[str | None, list[int]] = {}
    for i, same in enumerate(groups):
        by_adapter.setdefault(same[0].adapter, []).append(i)
    done: set[int] = set()
    for adapter, distinct in by_adapter.items():
        plans, _ = plan_heads([groups[i][0].prompt_ids for i in distinct], min_tokens, budget)
        heads: dict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for plan in plans:
            if plan.head not in heads:
                with rows([adapter]):
                    cache = prefill(model, [list(plan.head)], [1], device)[0]
                heads[plan.head] = ([layer.keys for layer in cache.layers],
                                    [layer.values for layer in cache.layers])
                counts.computed += len(plan.head)
            keys, values = heads[plan.head]
            members = [distinct[i] for i in plan.members]
            with rows([adapter] * len(members)):
                prefilled = prefill_cached(
                    model, [([k[..., :r, :] for k in keys], [v[..., :r, :] for v in values])
                            for r in plan.reuse],
                    [groups[i][0].prompt_ids[r:] for i, r in zip(members, plan.reuse, strict=True)],
                    [sum(request.sampling.n for request in groups[i]) for i in members], device)
            counts.computed += plan.width * len(members)
            counts.head += sum(plan.reuse)
            counts.shared += sum(len(request.prompt_ids) for i in members
                                 for request in groups[i][1:])
            done.update(members)
            join(members, prefilled)
    return done
