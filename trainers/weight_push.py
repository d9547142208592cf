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
    disk       path=<dir> (written once, one         loads the safetensors directory
               bucket-sized shard at a time)

``ExportedWeights`` is re-iterable, not a list: each iteration calls ``export_weights()`` again
(the gateway iterates it once per replica), so the sending side holds at most the bucket being
sent and the tensor being exported (two buckets) whatever the model size. A one-process FSDP
engine exports views of its parameters (no copy at all); a worker group streams rank 0's
tensors one pipe message each (``worker_group.py``), so the controller never holds the model.

What a receiver holds is the receiver's business: ``LocalEngine`` stages a whole update before
copying it in (an update is all or nothing), an engine server does so in its own process.

Example:
    >>> import torch
    >>> from areal_agents.trainers.placement import InferencePlacement
    >>> push = WeightPush(InferencePlacement())
    >>> update = asyncio.run(push.update(lambda: iter([("w", torch.ones(2))]), version=3))
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

import torch

from areal_agents.engines.base import WeightUpdate
from areal_agents.errors import ConfigError

from .placement import InferencePlacement
from .weight_transport import DiskTransport

__all__ = ["ExportedWeights", "WeightPush"]

NamedTensor = tuple[str, torch.Tensor]
Export = Callable[[], Iterable[NamedTensor]]


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

    Raises:
        ConfigError: a transport the Trainer does not carry out here (``nccl``).
    """

    def __init__(self, placement: InferencePlacement,
                 directory: str | os.PathLike[str] | None = None) -> None:
        self.transport = placement.resolved_transport()
        if self.transport == "nccl":
            raise ConfigError("Policy.inference: transport='nccl' is not wired to engines yet "
                              "(NCCLTransport is tested on gloo only); use 'shm' or 'disk'")
        self.bucket_bytes = placement.bucket_bytes
        self._temporary = directory is None and self.transport == "disk"
        self.directory = (Path(tempfile.mkdtemp(prefix="weights-")) / "latest" if self._temporary
                          else Path(directory or "."))

    async def update(self, export: Export, version: int) -> WeightUpdate:
        """The update that brings a replica to the weights ``export()`` yields, at ``version``.

        A ``disk`` update is written here (in a worker thread, one bucket-sized shard at a
        time) before it is returned, so the replicas keep serving while it is written; the
        other transports stream when the replicas iterate the update.

        Raises:
            Exception: whatever ``export`` raises while a ``disk`` update is written (no
                directory is left half-written).
        """
        if self.transport == "disk":
            transport = DiskTransport(self.directory, self.bucket_bytes)
            await asyncio.to_thread(transport.send, export())
            return WeightUpdate(path=str(self.directory), version=version)
        return WeightUpdate(named_tensors=ExportedWeights(export), version=version)

    def close(self) -> None:
        """Remove the temporary update directory, if this push made one (idempotent)."""
        if self._temporary:
            shutil.rmtree(self.directory.parent, ignore_errors=True)
            self._temporary = False
