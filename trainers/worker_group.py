"""``WorkerGroupEngine``: a ``TrainEngine`` whose model lives in ``TrainPlacement.world_size``
worker processes (one engine per rank, ``launcher.DistributedEngineGroup``).

What crosses the pipes per call::

    train_step        each data-parallel rank: a RowShard (its rows + every row's length)
                      and the loss function (pickled: algorithms are module-level dataclasses)
    forward_logprobs  every rank: the full batch (FSDP/Archon run it collectively over all
                      rows); rank 0's [B, T] log-probs come back
    export_weights    rank 0's (name, tensor) pairs, one message each (a generator: one
                      tensor in flight; the other ranks drain their collective generators)
    write_weights     a path: rank 0 writes the safetensors dir of a disk weight push
                      itself (no tensor crosses the pipes)
    save / load       a path; every rank writes/reads its DCP shards

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

import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from areal_agents.errors import ConfigError
from areal_agents.samples import TokenBatch

from .backends import backend_factory
from .base import LossFn, TrainEngine
from .launcher import DistributedEngineGroup
from .placement import TrainPlacement, check_train_placement, engine_parallel_kwargs

__all__ = ["RowShard", "WorkerGroupEngine", "shard_batch", "shard_rows"]

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
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    return sorted({0, *order[dp_rank::dp]})


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


def shard_batch(batch: TokenBatch, dp_rank: int, dp: int) -> RowShard:
    """``RowShard`` of the rows ``shard_rows`` gives data-parallel rank ``dp_rank``."""
    lengths = [int(n) for n in batch.attention_mask.sum(-1).tolist()]
    rows = shard_rows(lengths, dp_rank, dp)
    return RowShard(rows, batch.select(rows), lengths, int(batch.input_ids.shape[1]))


class _RankEngine:
    """The engine of one worker rank, as the controller drives it."""

    def __init__(self, factory: Callable[..., Any], model_bytes: bytes,
                 kwargs: dict[str, Any]) -> None:
        self.engine = factory(pickle.loads(model_bytes), **kwargs)

    def train_step(self, data: RowShard | TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        batch = data.expand() if isinstance(data, RowShard) else data
        return self.engine.train_step(batch, loss_fn)

    def forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        return self.engine.forward_logprobs(batch)

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.engine.export_weights()

    def write_weights(self, path: str, bucket_bytes: int) -> int:
        import torch.distributed as dist

        from .weight_transport import DiskTransport

        tensors = self.engine.export_weights()  # collective: every rank walks it
        if dist.get_rank() != 0:
            for _ in tensors:
                pass
            return 0
        return DiskTransport(path, bucket_bytes).send(tensors)

    def save(self, path: str, version: int) -> None:
        self.engine.version = version  # the controller owns the version; DCP records it
        self.engine.save(path)

    def load(self, path: str) -> tuple[int, int]:
        self.engine.load(path)
        return self.engine.step, self.engine.version

    def close(self) -> None:
        self.engine.close()


def _check_gpus(world_size: int) -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < world_size:
        raise ConfigError(f"Policy.train: device='cuda' with world_size={world_size} needs one "
                          f"GPU per rank, {count} visible; lower world_size or use device='cpu'")


def _build_rank_engine(factory: Callable[..., Any], model_bytes: bytes,
                       kwargs: dict[str, Any]) -> _RankEngine:
    return _RankEngine(factory, model_bytes, kwargs)


class WorkerGroupEngine(TrainEngine):
    """One trainable policy trained by ``placement.world_size`` worker processes.

    Implements ``TrainEngine`` by driving one backend engine per rank (see the module
    docstring for what each call sends). Blocking calls wait on pipes (the GIL is released),
    so policies run by ``asyncio.to_thread`` train concurrently. The controller keeps no copy
    of the model: the workers unpickle their own.

    Args:
        model: what the backend's factory takes (a ``transformers`` model, a path, a tiny
            spec...); pickled once, unpickled on every rank.
        placement: the layout (``world_size > 1``; degrees checked against ``backend``).
        backend: the registered backend name.
        factory: the engine factory (default: the registry's, ``backend_factory(backend)``);
            must be picklable by reference (a module-level class or function).
        lr, lora, **train_kwargs: the backend engine's arguments, as in one process.
        timeout: seconds one call may take before the group is stopped (``TrainError``).
        grace: seconds the other ranks get to answer once a rank failed.

    Raises:
        ConfigError: the backend cannot run ``placement``, or ``device="cuda"`` with fewer
            visible GPUs than ranks.
        TrainError: a rank failed to build its engine (its traceback), or any later call
            failed on some rank; a group that stopped answering is stopped for good.

    Example:
        >>> engine = WorkerGroupEngine("tiny:xs", TrainPlacement(world_size=2), lr=1e-3)
        ...     # doctest: +SKIP
        >>> engine.train_step(batch, algorithm.loss)["loss"]  # doctest: +SKIP
    """

    def __init__(self, model: Any, placement: TrainPlacement, *, backend: str = "fsdp",
                 factory: Callable[..., Any] | None = None, lr: float = 1e-5, lora: Any = None,
                 timeout: float = 3600.0, grace: float = 10.0, **train_kwargs: Any) -> None:
        check_train_placement(backend, placement)
        self.placement = placement
        self.step = 0
        self.version = 0
        kwargs = {"lr": lr, "lora": lora, **engine_parallel_kwargs(backend, placement),
                  **train_kwargs}
        device = placement.resolved_device()
        if device == "cpu":
            kwargs.setdefault("device", "cpu")
        else:
            _check_gpus(placement.world_size)
        self._group = DistributedEngineGroup(
            placement.world_size, _build_rank_engine, factory or backend_factory(backend),
            pickle.dumps(model), kwargs, threads=placement.threads, device=device,
            timeout=timeout, grace=grace)

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step; each data-parallel rank receives only its rows (``RowShard``);
        returns the stats summed over ranks (rank 0's)."""
        p = self.placement
        assert p.dp is not None
        if p.dp == 1:
            per_dp = {0: (batch, loss_fn)}
        else:
            per_dp = {d: (shard_batch(batch, d, p.dp), loss_fn) for d in range(p.dp)}
        no_kwargs: dict[str, Any] = {}
        per_rank = [(per_dp[p.dp_rank(r)], no_kwargs) for r in range(p.world_size)]
        stats = self._group.call_each("train_step", per_rank)[0]
        self.step += 1
        return stats

    def forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[B, T]`` log-probs (every rank gets the full batch; rank 0's result)."""
        return self._group.call("forward_logprobs", batch)[0]

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank 0's ``(hf_name, full CPU tensor)`` pairs, streamed one message each."""
        yield from self._group.stream("export_weights")

    def write_weights(self, path: str, bucket_bytes: int) -> int:
        """Rank 0 writes ``export_weights()`` to the safetensors dir ``path`` (a
        ``DiskTransport`` of ``bucket_bytes`` shards); returns the bytes written. The weight
        push's disk path (``weight_push.WritesWeights``): no tensor reaches the controller."""
        return self._group.call("write_weights", path, bucket_bytes)[0]

    def save(self, path: str) -> None:
        """Every rank writes its shards of model, optimizer, RNG, step and ``version``."""
        self._group.call("save", path, self.version)

    def load(self, path: str) -> None:
        """Every rank restores ``path``; ``step`` and ``version`` come back from rank 0."""
        self.step, self.version = self._group.call("load", path)[0]

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._group.close()
