"""Weight transports: stream ``(name, tensor)`` from the training side to an engine in buckets.

Every transport has a sender side (``send``) and a receiver side (``receive(manifest)``)::

    sender (trainer)                                  receiver (engine)
    manifest = transport.manifest()  ── small dict ─► it = receive(manifest)
    transport.send(engine.export_weights())           engine.update_weights(WeightUpdate(
        bucket 1 ──────────────────────────────────►      named_tensors=it))
        bucket 2 ──────────────────────────────────►  (yields name, tensor as they arrive)
        end marker ────────────────────────────────►  (iterator ends)

==========================  =================================================================
``TensorTransport``         ``tensors``: in process, the tensors themselves (no copy)
``SharedMemoryTransport``   ``shm``: same host, one reusable shared-memory block
``DiskTransport``           ``disk``: a safetensors directory (HF names), what vLLM loads
``NCCLTransport``           ``nccl``: a process group (NCCL on GPU, gloo on CPU)
==========================  =================================================================

Contract (all transports):
    * Ordering: the receiver yields the tensors in the order the sender was given them.
    * Dtype and shape: unchanged (bf16 stays bf16); received tensors are contiguous CPU
      tensors (NCCL: on the receiver's device) that the receiver owns.
    * Bucket bound: at most ``bucket_bytes`` of tensor data is in flight at once; with a
      consumer that copies each tensor into its model as it comes, a push needs at most two
      buckets of extra memory (shared memory: the block + the receiver's copy of one bucket).
      A tensor larger than ``bucket_bytes`` goes as a bucket of its own
      (``SharedMemoryTransport``: in pieces of ``bucket_bytes``, assembled by the receiver).
    * Failure: the sender raises (``WeightSyncError``, or the error of its tensor source) and
      marks the stream aborted; the receiver then raises ``WeightSyncError`` instead of ending,
      so an update is complete only when the receiver's iterator ends normally. Tensors yielded
      before the error belong to an incomplete update: the engine discards them and keeps its
      version (``LocalEngine`` stages every tensor before copying, so its weights are
      untouched). A receiver that stops early (its consumer raised) makes the sender raise.

Example:
    >>> import torch
    >>> transport = TensorTransport(bucket_bytes=64)  # one bucket: send, then receive
    >>> manifest = transport.manifest()
    >>> transport.send([("a", torch.ones(2)), ("b", torch.zeros(3))])
    20
    >>> [(n, t.tolist()) for n, t in receive(manifest)]
    [('a', [1.0, 1.0]), ('b', [0.0, 0.0, 0.0])]
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from safetensors.torch import load_file

from areal_agents.engines.base import InferenceEngine, WeightUpdate
from areal_agents.errors import WeightSyncError

from .weight_shm import SharedMemoryTransport, receive_shared
from .weight_sync import (
    DEFAULT_BUCKET_BYTES,
    INDEX_FILE,
    buckets,
    load_safetensors_dir,
    save_safetensors_dir,
    tensor_bytes,
)

NamedTensor = tuple[str, torch.Tensor]
Manifest = dict[str, Any]

__all__ = [
    "DiskTransport",
    "Manifest",
    "SharedMemoryTransport",
    "TensorTransport",
    "WeightTransport",
    "push_to_engine",
    "receive",
]


class WeightTransport(Protocol):
    """The sender side of a transport. ``receive(manifest)`` (or ``transport.receive``) is the
    receiver side; see the module docstring for the ordering, dtype, bound and failure rules."""

    bucket_bytes: int

    def manifest(self) -> Manifest:
        """A small JSON-ready description for the receiver, valid before ``send`` starts;
        ``manifest["kind"]`` names the transport."""
        ...

    def send(self, named_tensors: Iterable[NamedTensor]) -> int:
        """Stream the tensors bucket by bucket (blocking); returns the bytes sent.

        Raises:
            WeightSyncError: the receiver stopped early or did not keep up within the timeout.
        """
        ...

    def receive(self, manifest: Manifest) -> Iterator[NamedTensor]:
        """The receiver side: yield ``(name, tensor)`` in order; raise ``WeightSyncError`` if
        the stream was aborted."""
        ...

    def close(self) -> None:
        """Release the transport's resources (idempotent)."""
        ...


_END = object()
_channels: dict[str, TensorTransport] = {}
_channel_ids = itertools.count()


class TensorTransport:
    """In process: the tensors themselves, handed over bucket by bucket through a short queue
    (zero copy: a received tensor is the sender's tensor, detached).

    ``send`` and the receiver's iteration run in two threads (``push_to_engine`` does this),
    unless the whole update fits one bucket. One transport carries one update at a time.

    Args:
        bucket_bytes: the most tensor bytes handed over at once.
        timeout: seconds either side waits for the other before raising ``WeightSyncError``.
    """

    kind = "tensors"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout: float = 600.0) -> None:
        self.bucket_bytes, self.timeout = bucket_bytes, timeout
        self._id = f"{os.getpid()}-{next(_channel_ids)}"
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2)  # a bucket + the end marker
        self._stopped = threading.Event()
        _channels[self._id] = self

    def manifest(self) -> Manifest:
        return {"kind": self.kind, "channel": self._id, "bucket_bytes": self.bucket_bytes}

    def send(self, named_tensors: Iterable[NamedTensor]) -> int:
        self._stopped.clear()
        total = 0
        try:
            for bucket in buckets(named_tensors, self.bucket_bytes):
                self._put([(n, t.detach()) for n, t in bucket])
                total += sum(tensor_bytes(t) for _, t in bucket)
                del bucket  # handed over: not held while the next one fills
        except WeightSyncError:
            raise
        except BaseException as exc:
            with contextlib.suppress(WeightSyncError):  # no receiver: still raise exc itself
                self._put(exc, deadline=time.monotonic() + 1.0)
            raise
        self._put(_END)
        return total

    def _put(self, item: Any, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + self.timeout
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                if time.monotonic() > deadline:
                    raise WeightSyncError(
                        f"the receiver took no bucket within {self.timeout} s; is "
                        "receive(manifest) being iterated in another thread?") from None
        raise WeightSyncError("the receiver stopped before the update was complete")

    def receive(self, manifest: Manifest) -> Iterator[NamedTensor]:
        return receive(manifest, timeout=self.timeout)

    def close(self) -> None:
        _channels.pop(self._id, None)


def _receive_tensors(manifest: Manifest, timeout: float) -> Iterator[NamedTensor]:
    transport = _channels.get(manifest["channel"])
    if transport is None:
        raise WeightSyncError(f"no TensorTransport channel {manifest['channel']!r} in this "
                              "process; in-process tensors cannot cross processes (use shm)")
    return _drain_channel(transport, timeout)


def _drain_channel(transport: TensorTransport, timeout: float) -> Iterator[NamedTensor]:
    done = False
    try:
        while True:
            try:
                item = transport._queue.get(timeout=timeout)
            except queue.Empty:
                raise WeightSyncError(f"no bucket arrived within {timeout} s") from None
            if item is _END:
                done = True
                return
            if isinstance(item, BaseException):
                raise WeightSyncError(f"the sender aborted the update: {item!r}") from item
            yield from item
    finally:
        if not done:  # stopped early or failed: release the sender (it raises)
            transport._stopped.set()
            with contextlib.suppress(queue.Empty):
                transport._queue.get_nowait()


class DiskTransport:
    """A safetensors directory at ``path`` with HF names, sharded in files of at most
    ``bucket_bytes`` (a larger tensor gets a file of its own) plus an HF index.

    Written to ``<path>.partial`` and renamed into place, so a reader never sees half an
    update; an existing ``path`` is replaced. The receiver reads one shard at a time. This is
    the directory vLLM/SGLang reload from (``vllm_update_from_disk``/``sglang_update_from_disk``).

    Args:
        path: the update directory (what the manifest points at).
        bucket_bytes: the most tensor bytes per shard file.
    """

    kind = "disk"

    def __init__(self, path: str | os.PathLike[str],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.path, self.bucket_bytes = os.fspath(path), bucket_bytes

    def manifest(self) -> Manifest:
        return {"kind": self.kind, "path": self.path, "bucket_bytes": self.bucket_bytes}

    def send(self, named_tensors: Iterable[NamedTensor]) -> int:
        total = 0

        def counted() -> Iterator[NamedTensor]:
            nonlocal total
            for name, t in named_tensors:
                total += tensor_bytes(t)
                yield name, t

        save_safetensors_dir(counted(), self.path, self.bucket_bytes)
        return total

    def receive(self, manifest: Manifest) -> Iterator[NamedTensor]:
        return receive(manifest)

    def close(self) -> None:
        """Nothing to release (the directory stays for engines that load it later)."""


def receive(manifest: Manifest, *, timeout: float = 600.0,
            borrow: bool = False) -> Iterator[NamedTensor]:
    """The receiver side of a ``tensors``, ``shm`` or ``disk`` transport (the kind is read from
    ``manifest["kind"]``); yields ``(name, tensor)`` in the sender's order.

    An ``nccl`` stream needs its process group: use ``NCCLTransport.receive``. ``borrow``
    (shm only) yields views into the shared block, valid until the next tensor is asked for
    (see ``receive_shared``); other kinds ignore it (``tensors`` never copies).

    Raises:
        WeightSyncError: the sender aborted, nothing arrived within ``timeout`` seconds, or the
            directory of a ``disk`` manifest is missing.
        ValueError: an unknown ``kind``.
    """
    kind = manifest.get("kind")
    if kind == "tensors":
        return _receive_tensors(manifest, timeout)
    if kind == "shm":
        return receive_shared(manifest, timeout=timeout, borrow=borrow)
    if kind == "disk":
        if not os.path.isdir(manifest["path"]):
            raise WeightSyncError(f"no weight directory at {manifest['path']!r}; was it sent "
                                  "(DiskTransport.send) and is it on this host's filesystem?")
        return _read_dir(manifest["path"])
    raise ValueError(f"unknown transport kind {kind!r}; expected one of tensors, shm, disk "
                     "(nccl: NCCLTransport.receive)")


async def push_to_engine(engine: InferenceEngine, transport: WeightTransport,
                         named_tensors: Iterable[NamedTensor], *,
                         version: int | None = None) -> int:
    """Send ``named_tensors`` through ``transport`` into ``engine.update_weights``; returns the
    bytes sent.

    A streaming transport (tensors, shm) sends from a worker thread while the engine consumes
    the receiver's iterator; a disk transport writes the directory first and hands the engine
    ``WeightUpdate(path=...)`` (an engine server then reads it itself). Pausing and resuming
    the engines is the caller's (``Gateway.push_weights``).

    Raises:
        WeightSyncError: the transfer failed (the sender's or the receiver's side).
        Exception: the engine's own error (e.g. ``KeyError`` for an unknown name); the sender
            is stopped first.
    """
    manifest = transport.manifest()
    if manifest["kind"] == "nccl":
        raise ValueError("push_to_engine runs both sides in this process; with nccl the engine's "
                         "ranks call NCCLTransport.receive() while rank src calls send()")
    if manifest["kind"] == "disk":
        sent = await asyncio.to_thread(transport.send, named_tensors)
        await engine.update_weights(WeightUpdate(path=manifest["path"], version=version))
        return sent
    sending = asyncio.get_running_loop().run_in_executor(None, transport.send, named_tensors)
    received = transport.receive(manifest)
    try:
        await engine.update_weights(WeightUpdate(named_tensors=received, version=version))
    except BaseException:
        getattr(received, "close", lambda: None)()  # the sender sees the stop and raises
        with contextlib.suppress(Exception):
            await sending
        raise
    getattr(received, "close", lambda: None)()  # an engine that stopped reading early
    return await sending


def _read_dir(path: str) -> Iterator[NamedTensor]:
    """The tensors of a safetensors directory in the sender's order (the HF index lists them
    so; a file stores its tensors sorted), one file in memory at a time."""
    index_path = os.path.join(path, INDEX_FILE)
    if not os.path.exists(index_path):  # not written by DiskTransport: file order
        yield from load_safetensors_dir(path)
        return
    with open(index_path) as fh:
        weight_map: dict[str, str] = json.load(fh)["weight_map"]
    names_by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        names_by_file.setdefault(file, []).append(name)
    for file, names in names_by_file.items():
        tensors = load_file(os.path.join(path, file))
        for name in names:
            yield name, tensors.pop(name)
