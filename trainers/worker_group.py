"""``WorkerGroupEngine``: a ``TrainEngine`` whose model lives in ``TrainPlacement.world_size``
worker processes (one engine per rank, ``launcher.DistributedEngineGroup``).

What crosses the pipes per call::

    train_step        each data-parallel rank: a RowShard (its rows + every row's length)
                      and the loss function (pickled: algorithms are module-level dataclasses);
                      a batch's tensors travel as one flat buffer (PackedBatch). One process
                      whose pushes follow its train steps also packs the new weights into a
                      shared-memory slot of the controller's (weight_slots.py): the push then
                      reads them there
    forward_logprobs  each data-parallel rank: its RowShard (the rows training gives it); it
                      returns the log-probs of the rows it owns, gathered here in row order
                      (``shard_logprobs``: every rank runs as many micro-batch forwards, so
                      the collectives of FSDP/Archon stay in step)
    export_weights    rank 0's (name, tensor) pairs packed into messages of at most
                      ``stream_bytes`` (``tensor_pack.py``: a flat byte buffer each, one message
                      in flight; the other ranks drain their collective generators)
    write_weights     a path: rank 0 writes the safetensors dir of a disk weight push
                      itself (no tensor crosses the pipes)
    save / load       a path; every rank writes/reads its DCP shards
    ref_logprobs      as forward_logprobs, on the frozen KL reference the ranks hold
    warm start        the SFT steps are train_steps (each rank its rows) on a temporary engine;
                      then rank 0's weights are broadcast and every rank builds the policy's
                      engine (and reference) from them

Nothing large lives in the controller: the ranks build the KL reference themselves
(``ReferenceSpec``: a copy of their model, or ``ref_model`` loaded on the rank; rank 0 saves
it once for resumes) and run the SFT warm start (``WarmStartPlan``), so neither the
reference nor a warm-start engine exists in the controller.

Row sharding: ``trainers/row_shards.py``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from areal_agents.errors import ConfigError
from areal_agents.samples import TokenBatch

from .backends import backend_factory
from .base import LossFn, TrainEngine
from .launcher import DistributedEngineGroup
from .placement import TrainPlacement, check_train_placement, engine_parallel_kwargs
from .row_shards import (
    PackedBatch,
    RowShard,
    Wire,
    gather_logprobs,
    shard_batch,
    shard_logprobs,
    unwire,
)
from .tensor_pack import Entry, PackedTensors, pack_tensors
from .weight_slots import SlotTarget, SlotWriter, WeightSlots

if TYPE_CHECKING:
    from .reference import ReferenceSpec
    from .warm_start import WarmStartPlan

__all__ = ["GroupReference", "ModelSource", "WorkerGroupEngine"]

STREAM_BYTES = 16 << 20
"""Bytes of tensors per pipe message of ``WorkerGroupEngine.export_weights`` (its
``stream_bytes``): what the controller holds of the model at once."""
@dataclass(frozen=True)
class ModelSource:
    """A model every rank loads itself (``Policy(model=spec, seed=seed).load()``), so the
    controller never materialises it: what ``WorkerGroupEngine`` takes instead of a model.

    Attributes:
        spec: ``Policy.model`` as a string (a tiny spec, a checkpoint directory, a hub id).
        seed: ``Policy.seed`` (seeds a tiny spec without ``seed=``).
    """

    spec: str
    seed: int = 0

    def load(self) -> Any:
        """The model (on the CPU, eval mode)."""
        from .policy import Policy

        return Policy(model=self.spec, seed=self.seed).load()[0]


def _unpickle_model(model_bytes: bytes) -> Any:
    """The model a rank trains: unpickled, or loaded from a ``ModelSource``."""
    model = pickle.loads(model_bytes)
    return model.load() if isinstance(model, ModelSource) else model


class _RankEngine:
    """The engines of one worker rank, as the controller drives them: the policy's engine
    and, with a ``ReferenceSpec``, its frozen KL reference. With ``warm_kwargs`` the rank
    first trains a temporary warm-start engine (``finish_warm_start`` then builds the others
    from its weights)."""

    def __init__(self, factory: Callable[..., Any], model_bytes: bytes, kwargs: dict[str, Any],
                 warm_kwargs: dict[str, Any] | None = None,
                 reference: ReferenceSpec | None = None) -> None:
        self._factory, self._kwargs, self._reference_spec = factory, kwargs, reference
        self.reference: Any = None
        self._model_bytes: bytes | None = None
        self._slots = SlotWriter()
        if warm_kwargs is None:
            self._start(_unpickle_model(model_bytes))
        else:  # kept until finish_warm_start: the skeleton the trained weights go into
            self._model_bytes = model_bytes
            self.engine = factory(_unpickle_model(model_bytes), **warm_kwargs)

    def _start(self, model: Any) -> None:
        """Build the reference (a copy of ``model`` unless ``ref_model``) and the engine."""
        import torch.distributed as dist

        if self._reference_spec is not None:
            from .reference import reference_model

            ref = reference_model(self._reference_spec, model, save=dist.get_rank() == 0)
            self.reference = self._factory(ref, **{**self._kwargs, "lora": None})
        self.engine = self._factory(model, **self._kwargs)

    def finish_warm_start(self) -> None:
        """Every rank: the warm-start engine's weights (rank 0's export, broadcast) go into a
        fresh copy of the model, from which the reference and the policy's engine are built
        (fresh optimizer, step 0)."""
        from .warm_start import copy_weights_into

        assert self._model_bytes is not None, "finish_warm_start without a warm start"
        model = _unpickle_model(self._model_bytes)
        self._model_bytes = None
        copy_weights_into(model, self.engine.export_weights())  # collective; rank 0 yields
        _broadcast_from_rank0(model)
        self.engine.close()
        self._start(model)

    def ref_logprobs(self, data: Wire, dp_rank: int = 0, dp: int = 1) -> Any:
        if isinstance(data, RowShard):
            return shard_logprobs(self.reference, data, dp_rank, dp)
        return self.reference.forward_logprobs(unwire(data))

    def train_step(self, data: Wire, loss_fn: LossFn) -> dict[str, float]:
        batch = data.expand() if isinstance(data, RowShard) else unwire(data)
        return self.engine.train_step(batch, loss_fn)

    def train_step_export(self, data: Wire, loss_fn: LossFn, target: SlotTarget,
                          ) -> tuple[dict[str, float], list[Entry] | None]:
        """One process: ``train_step``, then the weights it produced packed into the
        controller's shared-memory slot ``target`` before any other call can change them;
        their entries (``None``: they do not fit): ``WorkerGroupEngine.export_weights``
        serves them without a trip (``weight_slots.py``)."""
        stats = self.train_step(data, loss_fn)
        return stats, self._slots.write(target, self.engine.export_weights())

    def forward_logprobs(self, data: Wire, dp_rank: int = 0, dp: int = 1) -> Any:
        if isinstance(data, RowShard):
            return shard_logprobs(self.engine, data, dp_rank, dp)
        return self.engine.forward_logprobs(unwire(data))

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.engine.export_weights()

    def export_packed(self, max_bytes: int) -> Iterator[PackedTensors]:
        """Rank 0: the export packed into messages of ``max_bytes``; the other ranks walk
        their (collective) export and yield nothing."""
        import torch.distributed as dist

        tensors = self.engine.export_weights()
        if dist.is_initialized() and dist.get_rank() != 0:
            for _ in tensors:
                pass
            return
        yield from pack_tensors(tensors, max_bytes)

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
        self._slots.close()
        self.engine.close()
        if self.reference is not None:
            self.reference.close()


@torch.no_grad()
def _broadcast_from_rank0(model: Any) -> None:
    """Give every rank rank 0's ``model.state_dict()`` values (in place; through the GPU
    under NCCL)."""
    import torch.distributed as dist

    cuda = dist.get_backend() == "nccl"
    for tensor in model.state_dict().values():
        buffer = tensor.cuda() if cuda else tensor
        dist.broadcast(buffer, src=0)
        if cuda:
            tensor.copy_(buffer)


def _check_gpus(world_size: int) -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < world_size:
        raise ConfigError(f"Policy.train: device='cuda' with world_size={world_size} needs one "
                          f"GPU per rank, {count} visible; lower world_size or use device='cpu'")


def _build_rank_engine(factory: Callable[..., Any], model_bytes: bytes, kwargs: dict[str, Any],
                       warm_kwargs: dict[str, Any] | None,
                       reference: ReferenceSpec | None) -> _RankEngine:
    return _RankEngine(factory, model_bytes, kwargs, warm_kwargs, reference)


def _forward_logprobs(group: DistributedEngineGroup, method: str, batch: TokenBatch,
                      placement: TrainPlacement) -> torch.Tensor:
    if placement.dp == 1:  # every rank computes the same rows (TP/PP): rank 0's answer
        return group.call(method, PackedBatch.of(batch))[0]
    return gather_logprobs(batch, placement, lambda per_rank: group.call_each(method, per_rank))


class GroupReference:
    """A worker group's frozen KL reference, held by its ranks (sharded like the policy):
    ``forward_logprobs`` runs there and only the ``[B, T]`` log-probs come back. Built by
    ``WorkerGroupEngine(reference=...)``; closes with the group."""

    def __init__(self, group: DistributedEngineGroup, placement: TrainPlacement) -> None:
        self._group, self._placement = group, placement

    def forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[B, T]`` reference log-probs (each data-parallel rank computes its rows, as
        ``WorkerGroupEngine.forward_logprobs``)."""
        return _forward_logprobs(self._group, "ref_logprobs", batch, self._placement)

    def close(self) -> None:
        """Nothing to do: the ranks' reference is dropped by ``WorkerGroupEngine.close``."""


class WorkerGroupEngine(TrainEngine):
    """One trainable policy trained by ``placement.world_size`` worker processes.

    Implements ``TrainEngine`` by driving one backend engine per rank (see the module
    docstring for what each call sends). Blocking calls wait on pipes (the GIL is released),
    so policies run by ``asyncio.to_thread`` train concurrently. The controller keeps no copy
    of the model: the workers unpickle their own.

    Args:
        model: what the backend's factory takes (a ``transformers`` model, a path, a tiny
            spec...), pickled once and unpickled on every rank; or a ``ModelSource`` that
            every rank loads (the controller then never holds the model).
        placement: the layout (``world_size > 1``; degrees checked against ``backend``).
        backend: the registered backend name.
        factory: the engine factory (default: the registry's, ``backend_factory(backend)``);
            must be picklable by reference (a module-level class or function).
        lr, lora, **train_kwargs: the backend engine's arguments, as in one process.
        warm_start: an SFT warm start run on the ranks before RL (each rank trains on its
            rows; the losses are ``warm_start_losses``), on a temporary engine built as the
            one-process warm start builds it (``lr=warm_start.lr``, no LoRA or train_kwargs).
        reference: the KL reference the ranks build and hold (``reference``: a
            ``GroupReference``), from the weights after the warm start.
        timeout: seconds one call may take before the group is stopped (``TrainError``).
        grace: seconds the other ranks get to answer once a rank failed.
        group: the worker-group class (default ``DistributedEngineGroup``: processes of this
            machine; ``launcher: ray`` passes a ``RayEngineGroup`` bound to its placement).

    Attributes:
        stream_bytes: tensor bytes per pipe message of ``export_weights`` (``STREAM_BYTES``).

    Raises:
        ConfigError: the backend cannot run ``placement``, or ``device="cuda"`` with fewer
            visible GPUs than ranks.
        TrainError: a rank failed to build its engines or to warm start (its traceback; the
            workers are stopped), or any later call failed on some rank; a group that stopped
            answering is stopped for good.

    Example:
        >>> engine = WorkerGroupEngine("tiny:xs", TrainPlacement(world_size=2), lr=1e-3)
        ...     # doctest: +SKIP
        >>> engine.train_step(batch, algorithm.loss)["loss"]  # doctest: +SKIP
    """

    def __init__(self, model: Any, placement: TrainPlacement, *, backend: str = "fsdp",
                 factory: Callable[..., Any] | None = None, lr: float = 1e-5, lora: Any = None,
                 timeout: float = 3600.0, grace: float = 10.0,
                 warm_start: WarmStartPlan | None = None, reference: ReferenceSpec | None = None,
                 group: Callable[..., Any] | None = None, **train_kwargs: Any) -> None:
        check_train_placement(backend, placement)
        self.placement = placement
        self.step = 0
        self.version = 0
        self.stream_bytes = STREAM_BYTES
        # fold the export into the train call: an export followed a train step, and the
        # model fits one message (False for good once it did not); the slots it goes to
        self._fold_export: bool | None = None
        self._slots: WeightSlots | None = None
        self._packed: tuple[int, PackedTensors] | None = None  # (step, its weights) or None
        self._trained_at = -1  # self.step right after the latest train step
        layout: dict[str, Any] = dict(engine_parallel_kwargs(backend, placement))
        device = placement.resolved_device()
        if device == "cpu":
            layout["device"] = "cpu"
        elif group is None:  # local ranks need this host's GPUs; a Ray group has its own
            _check_gpus(placement.world_size)
        if placement.cpus is not None and group is not None:
            raise ConfigError("Policy.train.cpus pins worker processes of this machine; a "
                              "launcher's group (Ray) places its own ranks: drop cpus, or use "
                              "launcher='local'")
        pinned = (None if placement.cpus is None
                  else [placement.rank_cpus(r) for r in range(placement.world_size)])
        kwargs = {"lr": lr, "lora": lora, **layout, **train_kwargs}
        warm_kwargs = None if warm_start is None else {"lr": warm_start.lr, **layout}
        self._group = (group or DistributedEngineGroup)(
            placement.world_size, _build_rank_engine, factory or backend_factory(backend),
            pickle.dumps(model), kwargs, warm_kwargs, reference, threads=placement.threads,
            device=device, timeout=timeout, grace=grace,
            **({} if pinned is None else {"cpus": pinned}))
        self.reference = (None if reference is None
                          else GroupReference(self._group, placement))
        self.warm_start_losses: list[float] = []
        if warm_start is not None:
            try:
                self.warm_start_losses = warm_start.run(self)
                self._group.call("finish_warm_start")
            except BaseException:
                self.close()
                raise
            self.step = 0
            self._packed, self._trained_at = None, -1

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step; each data-parallel rank receives only its rows (``RowShard``),
        its tensors packed in one buffer (``PackedBatch``); returns the stats summed over
        ranks (rank 0's).

        One process whose weights were exported right after a train step before (and fit one
        ``stream_bytes`` message): the same call has the worker pack the new weights into a
        shared-memory slot (``_RankEngine.train_step_export``, ``weight_slots.py``), so the
        push's ``export_weights`` that follows reads them there, with no trip to the worker.
        """
        p = self.placement
        assert p.dp is not None
        self._packed = None  # the weights change now, whatever happens
        if self._slots is not None and self._slots.slot_bytes > self.stream_bytes:
            self._drop_slots()  # the messages were made smaller than the model since
        if self._slots is not None and self._fold_export:
            target = self._slots.target(self.step + 1)
            stats, entries = self._group.call("train_step_export", PackedBatch.of(batch),
                                              loss_fn, target)[0]
            self.step += 1
            if entries is None:  # the model outgrew its slot: stream it as before
                self._drop_slots()
            else:
                self._packed = (self.step, self._slots.read(target, entries))
                self._slots.unlink()  # the worker has it mapped: no file to leave behind
            self._trained_at = self.step
            return stats
        if p.dp == 1:
            per_dp = {0: (PackedBatch.of(batch), loss_fn)}
        else:
            per_dp = {d: (shard_batch(batch, d, p.dp), loss_fn) for d in range(p.dp)}
        no_kwargs: dict[str, Any] = {}
        per_rank = [(per_dp[p.dp_rank(r)], no_kwargs) for r in range(p.world_size)]
        stats = self._group.call_each("train_step", per_rank)[0]
        self.step += 1
        self._trained_at = self.step
        return stats

    def forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[B, T]`` log-probs; each data-parallel rank receives only its rows (the training
        split) and returns theirs (``shard_logprobs``), gathered here in row order."""
        return _forward_logprobs(self._group, "forward_logprobs", batch, self.placement)

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank 0's ``(hf_name, full CPU tensor)`` pairs, streamed in packed messages of at
        most ``stream_bytes`` (a larger tensor alone); each tensor is a view of its message.

        Right after a train step that packed its weights into a slot (``train_step``), they
        are those (views of the slot, valid until the train step after the next one): the
        worker packed them in that call, before anything else could change them.
        """
        packed = self._packed
        if packed is not None and packed[0] == self.step and packed[1].data.nbytes <= self.stream_bytes:
            yield from packed[1].unpack()
            return
        fold = (self._trained_at == self.step and self._fold_export is None
                and self.placement.world_size == 1)
        sizes = []
        for message in self._group.stream("export_packed", self.stream_bytes):
            sizes.append(message.data.nbytes)
            yield from message.unpack()
        if fold:  # an export followed a train step: fold the next ones into the train calls,
            self._fold_export = len(sizes) == 1 and sizes[0] > 0  # when one message holds
            if self._fold_export:  # the model
                self._slots = WeightSlots(sizes[0])

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
        self._packed, self._trained_at = None, -1
        self.step, self.version = self._group.call("load", path)[0]

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._group.close()
        self._drop_slots()

    def _drop_slots(self) -> None:
        """Stop folding the export into train calls (for good) and remove the slots."""
        self._packed, self._fold_export = None, False
        if self._slots is not None:
            self._slots.close()
            self._slots = None
