"""The train-step loop shared by the FSDP, Archon and Megatron backends.

A backend builds, parallelises and runs its model's forward; everything else about one
optimizer step happens here, the same way on every backend::

    slots = plan_rank_microbatches(lengths, rank, world_size, token_budget, group=...)
    run_train_step(
        lambda: accumulate_microbatches(batch, slots, forward, loss_fn, grad_scale=..., group=...),
        optimizer=..., scheduler=..., clip_grad_norm=..., num_tokens=..., step=...)

Every rank of a data-parallel group receives the *same full batch* and trains on its share:
sequences sorted longest first, rank ``r`` taking every ``world_size``-th one from position
``r``, packed into micro-batches under the token budget. When the ranks' micro-batch counts
differ, the shorter ranks run zero-weighted *filler* micro-batches (row 0, weight 0) so every
rank runs the same number of forward/backward passes and their collectives line up.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from areal_agents.errors import TrainError
from areal_agents.samples import TokenBatch
from areal_agents.trainers.base import LossFn
from areal_agents.trainers.microbatch import plan_microbatches
from areal_agents.trainers.schedules import apply_update
from areal_agents.trainers.shared_prefix import (
    PrefixPlan,
    RowPrompts,
    plan_shared_prefix,
    row_prompts,
)

__all__ = ["MicroBatchSlot", "accumulate_microbatches", "loss_positions",
           "plan_rank_microbatches", "rank_microbatches", "run_train_step", "with_fillers"]

Forward = Callable[[TokenBatch], tuple[torch.Tensor, torch.Tensor]]
"""``forward(micro_batch) -> (logprobs, entropy)``, both ``[b, t]``, with autograd."""


def loss_positions(mb: TokenBatch) -> torch.Tensor:
    """``[b, t]`` bool: the positions a ``LossFn`` reads, where ``loss_mask`` or
    ``loss_weights`` is non-zero. A backend's train forward computes log-probs and entropy
    there only (0 elsewhere, see ``LossFn``): prompt tokens never reach the LM head.

    Example:
        >>> mb = TokenBatch(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool),
        ...                 torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3),
        ...                 torch.zeros(1, 3, dtype=torch.long), torch.zeros(1))
        >>> loss_positions(mb).tolist()
        [[False, False, True]]
    """
    keep = mb.loss_mask != 0
    if mb.loss_weights is not None:
        keep = keep | (mb.loss_weights != 0)
    return keep


def batch_prompts(batch: TokenBatch) -> RowPrompts:
    """Every row's shared-prompt key (its tokens before its first loss position), for an
    engine that shares prompts to plan micro-batches by group (``plan_microbatches``)."""
    return row_prompts(batch.input_ids, batch.attention_mask, loss_positions(batch))


def prompt_plan(mb: TokenBatch) -> PrefixPlan | None:
    """The shared-prompt plan of micro-batch ``mb`` (``plan_shared_prefix`` split at its loss
    positions), or ``None`` when sharing would save too little."""
    return plan_shared_prefix(mb.input_ids, mb.attention_mask, loss_positions(mb))


def add_shared_prompt_stat(out: dict[str, float], saved: int,
                           group: dist.ProcessGroup | None, device: torch.device | str) -> None:
    """Set ``out["shared_prompt_tokens"]``: the prompt tokens a train step's forwards did not
    recompute, summed over ``group`` (a collective when given: call on every rank); left out
    when nothing was saved anywhere (the same decision on every rank)."""
    total = torch.tensor(float(saved))
    if group is not None:
        total = total.to(device)
        dist.all_reduce(total, group=group)
    if float(total) > 0:
        out["shared_prompt_tokens"] = float(total)


class MicroBatchSlot(NamedTuple):
    """One forward/backward pass of a rank: global ``rows`` of the batch and a ``weight``
    (1.0 for real rows; 0.0 for a filler, whose loss, gradients and stats count as zero)."""

    rows: list[int]
    weight: float


def rank_microbatches(lengths: Sequence[int], rank: int, world_size: int,
                      token_budget: int, prompts: RowPrompts | None = None) -> list[list[int]]:
    """Rank ``rank``'s micro-batches as global row indices (a pure function).

    Rows are sorted by length (longest first, ties by index); the rank takes every
    ``world_size``-th from position ``rank`` and packs them with ``plan_microbatches`` (by
    prompt group with ``prompts``: an engine that shares prompts keeps the rank's rows of one
    group in one micro-batch). Which rows a rank gets never depends on ``prompts``:
    ``WorkerGroupEngine`` sends each rank only those rows (``row_shards.shard_rows``).

    Example:
        >>> rank_microbatches([5, 17, 3, 9], rank=0, world_size=2, token_budget=20)  # 17, 5
        [[1], [0]]
        >>> rank_microbatches([5, 17, 3, 9], rank=1, world_size=2, token_budget=20)  # 9, 3
        [[3, 2]]

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)`` or ``token_budget`` < 1.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}) (got {rank})")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    mine = order[rank::world_size]
    local = prompts.select(mine) if prompts is not None else None
    return [[mine[j] for j in plan]
            for plan in plan_microbatches([lengths[i] for i in mine], token_budget, local)]


def with_fillers(plans: Sequence[list[int]], count: int) -> list[MicroBatchSlot]:
    """``plans`` as weight-1 slots, then zero-weighted filler slots up to ``count``.

    Example:
        >>> with_fillers([[3, 1]], count=2)
        [MicroBatchSlot(rows=[3, 1], weight=1.0), MicroBatchSlot(rows=[0], weight=0.0)]

    Raises:
        ValueError: ``count`` is smaller than ``len(plans)``.
    """
    if count < len(plans):
        raise ValueError(f"count={count} is smaller than the {len(plans)} micro-batches planned")
    return [MicroBatchSlot(list(p), 1.0) for p in plans] + [MicroBatchSlot([0], 0.0)] * (count - len(plans))


def plan_rank_microbatches(lengths: Sequence[int], rank: int, world_size: int, token_budget: int,
                           *, group: dist.ProcessGroup | None = None,
                           device: torch.device | str = "cpu",
                           prompts: RowPrompts | None = None) -> list[MicroBatchSlot]:
    """This rank's micro-batch slots (``rank_microbatches`` plus fillers).

    Args:
        lengths: real length of every row of the full batch.
        rank, world_size: this rank's index and the number of ranks sharing the batch.
        token_budget: maximum padded tokens per micro-batch.
        group: the ranks whose slot counts must agree (an all-reduce MAX over it, a
            collective); ``None`` keeps this rank's own count. Either way there is at least one
            slot, so a rank without rows still produces (zero) stats and gradients.
        device: where the count tensor lives for the all-reduce (CUDA for NCCL).
        prompts: every row's prompt key when the engine shares prompts (``rank_microbatches``).

    Raises:
        ValueError: ``lengths`` is empty (no rows to train on).
    """
    if not len(lengths):
        raise ValueError("a train step needs at least one sequence (got an empty batch)")
    plans = rank_microbatches(lengths, rank, world_size, token_budget, prompts)
    count = max(1, len(plans))
    if group is not None:
        t = torch.tensor([count], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        count = int(t.item())
    return with_fillers(plans, count)


def accumulate_microbatches(
    batch: TokenBatch,
    slots: Sequence[MicroBatchSlot],
    forward: Forward,
    loss_fn: LossFn,
    *,
    grad_scale: float = 1.0,
    aux_loss: Callable[[], torch.Tensor | None] | None = None,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Forward and backward every slot, accumulating gradients; returns the summed stats.

    Each slot runs ``forward`` then ``loss_fn`` and back-propagates
    ``(loss + aux) * weight * grad_scale``; ``loss``, ``aux_loss`` (when ``aux_loss`` gives a
    tensor) and ``loss_fn``'s stats are summed in float32, weighted, then all-reduced (SUM)
    over ``group`` in one packed tensor.

    Args:
        batch: the full batch; each slot's rows are ``batch.select(rows)``.
        slots: from ``plan_rank_microbatches``.
        forward: the backend's model call (``Forward``).
        loss_fn: the algorithm's ``LossFn``; its losses add up to the batch loss.
        grad_scale: multiplies every backward, e.g. the data-parallel size where FSDP
            *averages* gradients over ranks, so that they add up to the one-process gradient.
        aux_loss: read after each forward, e.g. a MoE load-balancing term already divided by
            the number of slots over all ranks; ``None`` (or returning ``None``): no term.
        group: the ranks whose stats are summed; ``None``: this rank's alone.
        device: where the stats are summed.
    """
    totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    for slot in slots:
        mb = batch.select(torch.tensor(slot.rows))
        logprobs, entropy = forward(mb)
        loss, stats = loss_fn(logprobs, entropy, mb)
        aux = aux_loss() if aux_loss is not None else None
        total = loss if aux is None else loss + aux
        (total * (slot.weight * grad_scale)).backward()
        totals["loss"] += loss.detach().float() * slot.weight
        if aux is not None:
            totals["aux_loss"] += aux.detach().float() * slot.weight
        for k, v in stats.items():
            totals[k] += torch.as_tensor(v, device=device).detach().float() * slot.weight
    keys = sorted(totals)
    packed = torch.stack([totals[k] for k in keys])
    if group is not None:
        dist.all_reduce(packed, group=group)
    return {k: float(v) for k, v in zip(keys, packed.tolist(), strict=True)}


def run_train_step(accumulate: Callable[[], dict[str, float]], *, optimizer: Any, scheduler: Any,
                   clip_grad_norm: Callable[[], float], num_tokens: int,
                   step: int) -> dict[str, float]:
    """One optimizer step: zero the gradients, ``accumulate()`` them (returns the batch
    stats, ``"loss"`` among them), refuse a non-finite loss, ``clip_grad_norm()`` (returns
    the norm before clipping), then ``apply_update``. The caller advances its step counter.

    Args:
        step: the engine's step counter, for the error message.

    Raises:
        TrainError: the loss is not finite (gradients are zeroed; nothing was updated).
    """
    optimizer.zero_grad(set_to_none=True)
    out = accumulate()
    if not math.isfinite(out["loss"]):
        optimizer.zero_grad(set_to_none=True)
        raise TrainError(f"non-finite loss {out['loss']} at step {step}; check the batch/loss")
    return apply_update(optimizer, scheduler, clip_grad_norm(), num_tokens, out)
