"""``WeightPush``: how one policy's trained weights reach its replicas, streamed in buckets.

The Trainer never lists a train engine's weights. Per push it builds one ``WeightUpdate`` from
the policy's ``InferencePlacement`` (its transport is ``placement.TRANSPORTS``' choice) and
hands it to ``Gateway.push_weights`` (pause all -> update all -> version + 1 -> resume all; a
failed update resumes and raises)::

    transport  the update                            what every replica does with it
    ---------  ------------------------------------  ------------------------------------------
    tensors    named_tensors=ExportedWeights(...)    iterates a fresh export (in process)
    shm        named_tensors=ExportedWeights(...)    RemoteEngine streams the export through its
                                                     shared-memory block of ``bucket_bytes``
    gloo       named_tensors=ExportedWeights(...)    the first replica broadcasts the export over
    (nccl)                                           the weight-update group the controller and
                                                     all the policy's servers join
                                                     (``engines/weights_group.ReplicaGroup``:
                                                     one broadcast for every replica), buckets of
                                                     ``bucket_bytes``; ``nccl`` is the same on
                                                     CUDA tensors
    disk       path=<dir> (written once, one         loads the safetensors directory
               bucket-sized shard at a time; by the
               worker group's rank 0 itself)

``ExportedWeights`` is re-iterable, not a list: each iteration calls ``export_weights()`` again
(the gateway iterates it once per replica), so the sending side holds at most the bucket being
sent and the tensor being exported (two buckets) whatever the model size. A one-process FSDP
engine exports views of its parameters (no copy at all); a worker group streams rank 0's
tensors packed into pipe messages of at most one bucket (``worker_group.py``,
``tensor_pack.py``; the push caps its ``stream_bytes``), so the controller never holds the model;
for a ``disk`` update its rank 0 writes the directory itself (``WritesWeights``) and no tensor
reaches the controller at all.

What a receiver holds is the receiver's business: an in-process ``LocalEngine`` stages a whole
update before copying it in (an update is all or nothing); an engine server spools a streamed
update to disk as it arrives and loads it tensor by tensor once complete (about two buckets of
extra memory, still all or nothing; ``engines/service.py``).

Example:
    >>> import torch
    >>> from areal_agents.trainers.placement import InferencePlacement
    >>> class Engine:
    ...     def export_weights(self):
    ...         yield "w", torch.ones(2)
    >>> update = asyncio.run(WeightPush(InferencePlacement()).update(Engine(), version=3))
    >>> [(n, t.tolist()) for n, t in update.named_tensors], update.version
    ([('w', [1.0, 1.0])], 3)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from areal_agents.engines.base import WeightUpdate

from .placement import InferencePlacement
from .weight_transport import DiskTransport

__all__ = ["ExportedWeights", "WeightPush", "WeightSource", "WritesWeights"]

NamedTensor = tuple[str, torch.Tensor]
Export = Callable[[], Iterable[NamedTensor]]


class WeightSource(Protocol):
    """What a push reads: a ``TrainEngine``'s ``export_weights()``."""

    def export_weights(self) -> Iterable[NamedTensor]: ...


@runtime_checkable
class WritesWeights(Protocol):
    """A train engine that writes its own safetensors directory (``WorkerGroupEngine``: rank
    0 writes it, so no tensor crosses to the controller)."""

    def write_weights(self, path: str, bucket_bytes: int) -> int:
        """Write ``export_weights()`` to ``path`` like ``DiskTransport(path, bucket_bytes)``;
        returns the bytes written."""
        ...


class ExportedWeights:
    """A train engine's weights as a re-iterable: ``iter()`` starts a fresh ``export()``.

    Not an ``Iterator``, so ``Gateway.update_weights`` hands it to every replica as it is
    instead of materialising it once for all of them.

    Args:
        export: e.g. ``engine.export_weights``; yields ``(hf_name, tensor)`` lazily.
    """

    def __init__(self, export: Export) -> None:
        self._export = export

    def __iter__(self) -> Iterator[NamedTensor]:
        return iter(self._export())


class WeightPush:
    """The weight updates of one policy's pushes, per its ``InferencePlacement``.

    Args:
        placement: the policy's inference placement (``resolved_transport()``,
            ``bucket_bytes``).
        directory: where a ``disk`` transport writes each update (replaced each time, renamed
            into place so a reader never sees half of one; None: a temporary directory that
            ``close`` removes); unused by the other transports.
    """

    def __init__(self, placement: InferencePlacement,
                 directory: str | os.PathLike[str] | None = None) -> None:
        self.transport = placement.resolved_transport()
        self.bucket_bytes = placement.bucket_bytes
        self._temporary = directory is None and self.transport == "disk"
        self.directory = (Path(tempfile.mkdtemp(prefix="weights-")) / "latest" if self._temporary
                          else Path(directory or "."))

    async def update(self, source: WeightSource, version: int) -> WeightUpdate:
        """The update that brings a replica to ``source``'s exported weights, at ``version``.

        A ``disk`` update is written here (in a worker thread, one bucket-sized shard at a
        time; by ``source.write_weights`` when it ``WritesWeights``) before it is returned, so
        the replicas keep serving while it is written; the other transports stream when the
        replicas iterate the update.

        Raises:
            Exception: whatever the export raises while a ``disk`` update is written (no
                directory is left half-written).
        """
        if getattr(source, "stream_bytes", 0) > self.bucket_bytes:  # a worker group's
            source.stream_bytes = self.bucket_bytes  # pipe messages stay within one bucket
        if self.transport == "disk":
            path = str(self.directory)
            if isinstance(source, WritesWeights):
                await asyncio.to_thread(source.write_weights, path, self.bucket_bytes)
            else:
                transport = DiskTransport(path, self.bucket_bytes)
                await asyncio.to_thread(transport.send, source.export_weights())
            return WeightUpdate(path=path, version=version)
        return WeightUpdate(named_tensors=ExportedWeights(source.export_weights), version=version)

    def close(self) -> None:
        """Remove the temporary update directory, if this push made one (idempotent)."""
        if self._temporary:
            shutil.rmtree(self.directory.parent, ignore_errors=True)
            self._temporary = False
