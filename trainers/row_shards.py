"""Row sharding of a batch across data-parallel ranks of a worker group
(``worker_group.WorkerGroupEngine``), and a batch's form on a worker's pipe.

Row sharding keeps the engines' "same full batch on every rank" contract without sending the
full batch: ``RowShard.expand`` rebuilds a batch of the full shape whose rows this rank never
trains on are zero placeholders with the right lengths. The engines' planner
(``trainers/step.rank_microbatches``) picks rows by length alone, so it picks exactly the rows
the controller sent (``shard_rows``), and ``loss_weights``/``stat_weights`` are batch-global
per-token weights, so a shard keeps the global normalisation. Row 0 travels to every rank: it
is the planner's zero-weighted filler row. Ranks of one TP/PP group share a data-parallel index
and get the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from areal_agents.samples import TokenBatch

from .placement import TrainPlacement
from .tensor_pack import PackedTensors, pack_tensors

__all__ = ["PackedBatch", "RowShard", "Wire", "gather_logprobs", "shard_batch", "shard_logprobs",
           "shard_rows", "unwire"]

_ONES = {"temperature", "top_p"}  # placeholder rows sample like defaults (never trained on)


def shard_rows(lengths: Sequence[int], dp_rank: int, dp: int) -> list[int]:
    """The rows data-parallel rank ``dp_rank`` of ``dp`` trains on, plus row 0 (the filler),
    sorted: the rows ``trainers/step.rank_microbatches`` assigns it (longest first, every
    ``dp``-th from position ``dp_rank``), whatever the token budget.

    Example:
        >>> shard_rows([5, 17, 3, 9], dp_rank=1, dp=2)  # by length: 1, 3, 0, 2
        [0, 2, 3]

    Raises:
        ValueError: ``dp_rank`` outside ``[0, dp)`` or no rows.
    """
    if not 0 <= dp_rank < dp:
        raise ValueError(f"dp_rank must be in [0, dp={dp}), got {dp_rank}")
    if not len(lengths):
        raise ValueError("a train step needs at least one sequence (got an empty batch)")
    return sorted({0, *_owned_rows(lengths, dp_rank, dp)})


def _owned_rows(lengths: Sequence[int], dp_rank: int, dp: int) -> list[int]:
    """The rows ``dp_rank`` trains on (longest first, every ``dp``-th), sorted."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    return sorted(order[dp_rank::dp])


@dataclass
class RowShard:
    """Some rows of a batch, and what is needed to rebuild a batch of the full shape.

    Attributes:
        rows: global row indices, sorted.
        batch: those rows (``TokenBatch.select``: trimmed to their longest row).
        lengths: the real length of every row of the full batch.
        width: the full batch's padded width ``T``.
    """

    rows: list[int]
    batch: TokenBatch
    lengths: list[int]
    width: int

    def __getstate__(self) -> dict[str, Any]:  # the batch crosses a pipe as one buffer
        return {**vars(self), "batch": PackedBatch.of(self.batch)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state, batch=state["batch"].unpack())

    def expand(self) -> TokenBatch:
        """A ``[len(lengths), width]`` batch: ``rows`` as sent, every other row a zero
        placeholder whose attention mask has its real length (so planners see the full batch).
        Positions past ``batch``'s width are padding of the rows sent, and no micro-batch of
        them reaches that far."""
        num_rows = len(self.lengths)
        idx = torch.tensor(self.rows, dtype=torch.long)
        out: dict[str, Any] = {}
        for f in fields(TokenBatch):
            part = getattr(self.batch, f.name)
            if not isinstance(part, torch.Tensor):
                out[f.name] = part
                continue
            shape = (num_rows, self.width) if part.dim() == 2 else (num_rows, *part.shape[1:])
            full = (torch.ones if f.name in _ONES else torch.zeros)(shape, dtype=part.dtype)
            if part.dim() == 2:
                full[idx, : part.shape[1]] = part
            else:
                full[idx] = part
            out[f.name] = full
        positions = torch.arange(self.width)
        out["attention_mask"] = positions[None, :] < torch.tensor(self.lengths)[:, None]
        return TokenBatch(**out)


@dataclass
class PackedBatch:
    """A ``TokenBatch`` as it crosses a worker's pipe: its tensors in one flat buffer
    (``tensor_pack.PackedTensors``: pickles as one byte copy, ~0.5 ms for a 32-row batch
    against ~2.7 ms for the tensors pickled one by one, both sides) and its other fields.

    Example:
        >>> import pickle
        >>> from areal_agents.samples import Sample, collate
        >>> batch = collate([Sample([5, 6, 7], [0, 1, 1], [0.0, -1.0, -2.0], [0, 0, 0])])
        >>> back = pickle.loads(pickle.dumps(PackedBatch.of(batch))).unpack()
        >>> torch.equal(back.input_ids, batch.input_ids), back.attention_mask.dtype
        (True, torch.bool)
    """

    tensors: PackedTensors
    others: dict[str, Any]

    @classmethod
    def of(cls, batch: TokenBatch) -> PackedBatch:
        named = [(f.name, getattr(batch, f.name)) for f in fields(TokenBatch)]
        tensors = [(n, v) for n, v in named if isinstance(v, torch.Tensor)]
        packs = list(pack_tensors(tensors, max_bytes=1 << 62))  # one buffer
        empty = PackedTensors([], np.empty(0, dtype=np.uint8))
        return cls(packs[0] if packs else empty,
                   {n: v for n, v in named if not isinstance(v, torch.Tensor)})

    def unpack(self) -> TokenBatch:
        """The batch; its tensors are views of one buffer (equal to the packed ones)."""
        return TokenBatch(**dict(self.tensors.unpack()), **self.others)


def shard_batch(batch: TokenBatch, dp_rank: int, dp: int) -> RowShard:
    """``RowShard`` of the rows ``shard_rows`` gives data-parallel rank ``dp_rank``."""
    lengths = [int(n) for n in batch.attention_mask.sum(-1).tolist()]
    rows = shard_rows(lengths, dp_rank, dp)
    return RowShard(rows, batch.select(rows), lengths, int(batch.input_ids.shape[1]))


def shard_logprobs(engine: Any, shard: RowShard, dp_rank: int,
                   dp: int) -> tuple[list[int], torch.Tensor]:
    """The log-probs of the rows data-parallel rank ``dp_rank`` owns in ``shard``: ``(rows,
    [len(rows), T'])`` (sorted rows; ``T'`` the shard's width), from
    ``engine.forward_logprobs``.

    With ``engine.token_budget`` the rank computes the micro-batches
    ``trainers/step.rank_microbatches`` plans for it (the training split), one
    ``forward_logprobs`` call each, and every rank makes as many calls (the most any rank
    plans; the others add row-0 fillers whose results are dropped), so the collective forwards
    of FSDP/Archon stay in step without any communication. Without it the engine gets the
    expanded batch (its placeholder rows computed too) in one call.
    """
    from .step import rank_microbatches

    width = int(shard.batch.input_ids.shape[1])
    budget = getattr(engine, "token_budget", None)
    if budget is None:
        owned = _owned_rows(shard.lengths, dp_rank, dp)
        return owned, engine.forward_logprobs(shard.expand())[owned, :width]
    plans = [rank_microbatches(shard.lengths, d, dp, int(budget)) for d in range(dp)]
    mine = plans[dp_rank]
    owned = sorted(row for plan in mine for row in plan)
    position = {row: i for i, row in enumerate(owned)}
    local = {row: i for i, row in enumerate(shard.rows)}
    out = torch.zeros(len(owned), width, dtype=torch.float32)
    for index in range(max(1, *(len(p) for p in plans))):
        slot = mine[index] if index < len(mine) else [0]  # a filler: every rank calls as often
        logprobs = engine.forward_logprobs(shard.batch.select([local[r] for r in slot]))
        if index < len(mine):
            for j, row in enumerate(slot):
                out[position[row], : logprobs.shape[1]] = logprobs[j, :width]
    return owned, out


def gather_logprobs(batch: TokenBatch, placement: TrainPlacement,
                    call_each: Callable[[list[tuple[tuple, dict]]], list[Any]]) -> torch.Tensor:
    """``[B, T]`` log-probs of ``batch`` from a group's ranks: ``call_each`` hands each rank
    ``(its RowShard, dp_rank, dp)`` and returns each rank's ``shard_logprobs``; the first rank
    of each data-parallel index supplies its rows."""
    p = placement
    assert p.dp is not None
    shards = {d: shard_batch(batch, d, p.dp) for d in range(p.dp)}
    no_kwargs: dict[str, Any] = {}
    results = call_each([((shards[p.dp_rank(r)], p.dp_rank(r), p.dp), no_kwargs)
                         for r in range(p.world_size)])
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    done: set[int] = set()
    for rank, (rows, logprobs) in enumerate(results):
        if p.dp_rank(rank) not in done:
            done.add(p.dp_rank(rank))
            out[rows, : logprobs.shape[1]] = logprobs
    return out


Wire = RowShard | PackedBatch | TokenBatch
"""A batch as a rank receives it."""


def unwire(data: PackedBatch | TokenBatch) -> TokenBatch:
    """The ``TokenBatch`` a rank received whole (packed or as is)."""
    return data.unpack() if isinstance(data, PackedBatch) else data
