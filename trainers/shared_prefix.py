"""Shared-prompt forward: rows of a batch that begin with the same prompt run it once.

A GRPO group is ``n`` completions of one prompt, and a training batch holds each prompt ``n``
times: a plain forward computes the prompt's hidden states ``n`` times, and on short answers
the prompt is most of the batch's tokens. This module splits each row at its first loss
position (its first trained token): rows whose tokens before that point are identical form a
group; one backbone pass runs each group's prompt once with a KV cache, a second pass runs
every row's remainder on top of its group's cached keys and values (gathered per row, so
gradients from every row flow back into the shared prompt), and the two passes' hidden states
are gathered into the ``[B, T, h]`` tensor a plain forward returns.

The values equal the plain forward's up to float rounding (matmuls of other shapes; tested to
1e-5 on log-probs and gradients). The plan is used only where it saves at least
``MIN_SAVING`` of the batch's real tokens, and only on transformers models whose cache is the
plain ``DynamicCache`` (every layer full attention; ``supports_shared_prefix``); ``FSDPEngine``
also turns it off under gradient checkpointing (which drops the cache) and FSDP2.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

MIN_SAVING = 0.2
"""Share prompts only when that removes at least this fraction of the batch's real tokens."""


class RowPrompts(NamedTuple):
    """Each row's shared-prompt key, as ``plan_shared_prefix`` groups rows: ``group[r]`` is the
    index of row ``r``'s prompt (its tokens before its first loss position) among the batch's
    distinct prompts, ``length[r]`` that prompt's length (0: a loss at position 0, which no
    plan can split). Micro-batch planners keep a group's rows together with it."""

    group: list[int]
    length: list[int]

    def select(self, rows: Sequence[int]) -> RowPrompts:
        """These rows' keys, in ``rows``'s order (group indices unchanged)."""
        return RowPrompts([self.group[r] for r in rows], [self.length[r] for r in rows])


def row_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_positions: torch.Tensor) -> RowPrompts:
    """Every row's prompt group and prompt length (see ``RowPrompts``).

    Example:
        >>> ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [4, 6, 7, 8]])
        >>> loss = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 1, 1]]).bool()
        >>> row_prompts(ids, ids != 0, loss)
        RowPrompts(group=[0, 0, 1], length=[2, 2, 2])
    """
    mask = attention_mask.bool()
    row_len = mask.sum(-1)
    trained = loss_positions.bool() & mask
    first = torch.where(trained.any(-1), trained.int().argmax(-1), row_len).tolist()
    rows = input_ids.tolist()
    groups: dict[tuple[int, ...], int] = {}
    group = [groups.setdefault(tuple(rows[r][:p]), len(groups)) for r, p in enumerate(first)]
    return RowPrompts(group, first)


def shares_enough(prompt_lengths: Iterable[int], distinct_prompt_tokens: int, real_tokens: int,
                  min_saving: float = MIN_SAVING) -> bool:
    """Whether rows with these prompt lengths, whose distinct prompts hold
    ``distinct_prompt_tokens``, run shared: no prompt is empty and the saving
    ``sum(prompt_lengths) - distinct_prompt_tokens`` is at least ``min_saving`` of the
    ``real_tokens`` (the rule of ``plan_shared_prefix``, which micro-batch planners cost by)."""
    lengths = list(prompt_lengths)
    if not lengths or min(lengths) < 1:
        return False
    return sum(lengths) - distinct_prompt_tokens >= min_saving * real_tokens


@dataclass(frozen=True)
class PrefixPlan:
    """How a right-padded ``[B, T]`` batch runs as ``G`` shared prompts plus ``B`` remainders.

    Attributes:
        group_of_row: ``[B]`` long, the prompt group of each row.
        prefix_len: ``[B]`` long, each row's prompt length (its first loss position).
        row_len: ``[B]`` long, each row's real length.
        prefix_ids: ``[G, P]`` long, each group's prompt, right padded with 0.
        prefix_mask: ``[G, P]`` bool.
        suffix_ids: ``[B, S]`` long, each row's tokens from its first loss position on.
        suffix_mask: ``[B, S]`` bool.
        saved_tokens: real tokens the plain forward computes that this plan does not.
    """

    group_of_row: torch.Tensor
    prefix_len: torch.Tensor
    row_len: torch.Tensor
    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    saved_tokens: int


def plan_shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       loss_positions: torch.Tensor,
                       min_saving: float = MIN_SAVING) -> PrefixPlan | None:
    """The shared-prompt plan of a batch, or ``None`` when it would save less than
    ``min_saving`` of the real tokens (or a row's first loss position is 0).

    Args:
        input_ids: ``[B, T]`` long, right padded.
        attention_mask: ``[B, T]`` bool/int.
        loss_positions: ``[B, T]`` bool, the trained tokens (a row without any keeps its whole
            length as its prompt).

    Example:
        >>> ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [4, 6, 7, 8]])
        >>> mask = ids != 0
        >>> loss = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 1, 1]]).bool()
        >>> plan = plan_shared_prefix(ids, mask, loss, min_saving=0.1)
        >>> plan.group_of_row.tolist(), plan.prefix_ids.tolist(), plan.saved_tokens
        ([0, 0, 1], [[5, 6], [4, 6]], 2)
        >>> plan.suffix_ids.tolist()
        [[7, 8], [9, 0], [7, 8]]
    """
    mask = attention_mask.bool()
    row_len = mask.sum(-1)
    keys = row_prompts(input_ids, mask, loss_positions)
    first = torch.tensor(keys.length, device=input_ids.device)
    rows = input_ids.tolist()
    prefixes: list[list[int]] = [[] for _ in range(max(keys.group) + 1)]
    for r, g in enumerate(keys.group):
        prefixes[g] = rows[r][: keys.length[r]]
    distinct = sum(len(p) for p in prefixes)
    if not shares_enough(keys.length, distinct, int(row_len.sum()), min_saving):
        return None
    saved = sum(keys.length) - distinct
    longest = max(len(p) for p in prefixes)
    prefix_ids = torch.zeros(len(prefixes), longest, dtype=input_ids.dtype)
    prefix_mask = torch.zeros(len(prefixes), longest, dtype=torch.bool)
    for g, p in enumerate(prefixes):
        prefix_ids[g, : len(p)] = torch.tensor(p, dtype=input_ids.dtype)
        prefix_mask[g, : len(p)] = True
    suffix_len = row_len - first
    width = max(int(suffix_len.max()), 1)
    offsets = first[:, None] + torch.arange(width)[None, :]  # [B, S]
    suffix_mask = torch.arange(width)[None, :] < suffix_len[:, None]
    gathered = input_ids.gather(1, offsets.clamp(max=input_ids.shape[1] - 1))
    suffix_ids = torch.where(suffix_mask, gathered, torch.zeros_like(gathered))
    device = input_ids.device
    return PrefixPlan(torch.tensor(keys.group, device=device), first, row_len,
                      prefix_ids.to(device), prefix_mask.to(device), suffix_ids, suffix_mask,
                      saved)


def supports_shared_prefix(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers causal LM) can run a plan: its cache is a plain
    ``DynamicCache`` (every layer full attention, no sliding window)."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    return getattr(config, "sliding_window", None) is None or not getattr(
        config, "use_sliding_window", False)


@functools.cache
def _cache_kwarg(forward_of: type) -> str:
    """transformers >= 5 names the cache argument ``cache``; 4.x ``past_key_values``."""
    params = inspect.signature(forward_of.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def shared_prefix_hidden(backbone: nn.Module, plan: PrefixPlan, width: int) -> torch.Tensor:
    """``[B, width, h]`` final hidden states of the batch ``plan`` was made from, computed
    with each group's prompt once (``backbone``: the transformers base model, e.g.
    ``model.model``). Padded positions hold zeros."""
    out = backbone(input_ids=plan.prefix_ids, attention_mask=plan.prefix_mask.long(),
                   use_cache=True)
    prefix_hidden = out.last_hidden_state
    cache = out.cache if _cache_kwarg(type(backbone)) == "cache" else out.past_key_values
    cache.batch_select_indices(plan.group_of_row)  # each row gets its group's keys/values
    suffix = plan.suffix_ids.shape[1]
    full_mask = torch.cat([plan.prefix_mask[plan.group_of_row], plan.suffix_mask], dim=1)
    positions = plan.prefix_len[:, None] + torch.arange(suffix, device=full_mask.device)
    suffix_hidden = backbone(input_ids=plan.suffix_ids, attention_mask=full_mask.long(),
                             position_ids=positions, use_cache=True,
                             **{_cache_kwarg(type(backbone)): cache}).last_hidden_state
    return assemble_hidden(plan, prefix_hidden, suffix_hidden, width)


def assemble_hidden(plan: PrefixPlan, prefix_hidden: torch.Tensor, suffix_hidden: torch.Tensor,
                    width: int) -> torch.Tensor:
    """``[B, width, h]``: each row's prompt positions from its group's ``prefix_hidden``
    ``[G, P, h]``, the rest from its ``suffix_hidden`` ``[B, S, h]``; zeros at padding."""
    rows, suffix = plan.suffix_ids.shape
    groups, longest = plan.prefix_ids.shape
    h = prefix_hidden.shape[-1]
    source = torch.cat([prefix_hidden.reshape(groups * longest, h),
                        suffix_hidden.reshape(rows * suffix, h),
                        prefix_hidden.new_zeros(1, h)])
    t = torch.arange(width, device=prefix_hidden.device)[None, :]  # [1, T]
    in_prefix = t < plan.prefix_len[:, None]
    in_row = t < plan.row_len[:, None]
    from_prefix = plan.group_of_row[:, None] * longest + t
    from_suffix = groups * longest + torch.arange(rows, device=t.device)[:, None] * suffix + (
        t - plan.prefix_len[:, None])
    index = torch.where(in_prefix, from_prefix,
                        torch.where(in_row, from_suffix, torch.full_like(t, source.shape[0] - 1)))
    return source[index]


def suffix_attention_mask(plan: PrefixPlan) -> torch.Tensor:
    """``[B, 1, S, P + S]`` bool: what each remainder token attends to, its group's real
    prompt tokens then the remainder causally (for an attention given the prompt's keys)."""
    rows, suffix = plan.suffix_ids.shape
    prompt = plan.prefix_mask[plan.group_of_row][:, None, None, :].expand(-1, 1, suffix, -1)
    causal = torch.ones(suffix, suffix, dtype=torch.bool, device=prompt.device).tril()
    return torch.cat([prompt, causal.expand(rows, 1, suffix, suffix)], dim=-1)
