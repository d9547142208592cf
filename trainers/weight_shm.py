"""``SharedMemoryTransport``: weights through one reusable shared-memory block, bucket by bucket.

Block layout (one ``multiprocessing.shared_memory`` block, created by the sender)::

    [ header: 64 x int64 ][ meta: meta_bytes (JSON of the bucket) ][ data: bucket_bytes ]
      0 epoch (one per update: the manifest carries it)
      1 published (buckets written so far)      2 state (0 streaming, 1 end, 2 aborted)
      3 meta length                             8 + r  reader r's acknowledged bucket count
                                                       (-1: reader r stopped early)

The handshake: the sender writes bucket ``k`` only after every reader has acknowledged bucket
``k - 1`` (copied it out); a reader copies bucket ``k`` and acknowledges it before yielding its
tensors (with ``borrow=True`` it yields views into the block and acknowledges when asked for
the tensor after the bucket's last). So the block is rewritten in place and a push needs at
most the block plus one copied bucket per reader of extra memory (borrowing: the block). Both
sides poll the header (short sleeps, bounded by a
timeout): no locks or pipes, so a reader may be any process on the host that knows the
manifest (e.g. an engine server that got it over HTTP). The data is written before the
counter that publishes it (x86 and ARM64 keep this order across the function calls here).

A bucket's metadata lists ``(name, dtype, shape, offset, nbytes, start)`` per entry: bytes
``[start, start + nbytes)`` of the tensor sit at ``offset`` in the data area. A tensor that fits
the block travels whole (``start == 0``, ``nbytes`` its size); a larger one travels in pieces,
one bucket each, and the receiver assembles it before yielding it (a fresh tensor, also when
borrowing).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from areal_agents.errors import WeightSyncError

HEADER_WORDS = 64
_EPOCH, _PUBLISHED, _STATE, _META_LEN, _ACK = 0, 1, 2, 3, 8
_STREAMING, _END, _ABORTED = 0, 1, 2
MAX_READERS = HEADER_WORDS - _ACK
ALIGN = 64


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _wait(cond: Any, timeout: float, what: str) -> Any:
    """Poll ``cond()`` until it returns a true value (returned), sleeping 20 us .. 1 ms.

    Raises:
        WeightSyncError: still false after ``timeout`` seconds.
    """
    deadline, pause = time.monotonic() + timeout, 2e-5
    while not (result := cond()):
        if time.monotonic() > deadline:
            raise WeightSyncError(f"shared-memory weight transfer: {what} within {timeout} s")
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
    return result


def _poll(header: torch.Tensor, copied: int) -> tuple[int] | None:
    """``(state,)`` once bucket ``copied + 1`` is published or the stream ended, else None."""
    state = int(header[_STATE])  # read before the counter: see the module docstring
    return (state,) if state != _STREAMING or int(header[_PUBLISHED]) > copied else None


class SharedMemoryTransport:
    """Weights for engines on the same host through one block of ``bucket_bytes``.

    Call ``manifest(reader)`` once per update and reader (it starts a new update), hand it to
    the receiver (``receive(manifest)`` in any local process), then ``send``. The block is
    reused across updates; ``close()`` unlinks it.

    Args:
        bucket_bytes: the data area; a larger tensor is sent in pieces of this size.
        num_readers: receivers of each update (e.g. replicas on this host); the sender waits
            for all of them before rewriting the block.
        meta_bytes: room for one bucket's JSON metadata (a bucket is closed early if full).
        timeout: seconds either side waits for the other.

    Example:
        >>> import threading, torch
        >>> from areal_agents.trainers.weight_transport import receive
        >>> with SharedMemoryTransport(bucket_bytes=64) as shm:
        ...     manifest = shm.manifest()
        ...     sender = threading.Thread(target=shm.send, args=([("w", torch.ones(4))],))
        ...     sender.start()
        ...     got = [(n, t.tolist()) for n, t in receive(manifest)]
        ...     sender.join()
        >>> got
        [('w', [1.0, 1.0, 1.0, 1.0])]
    """

    kind = "shm"

    def __init__(self, bucket_bytes: int = 256 * 2**20, *, num_readers: int = 1,
                 meta_bytes: int = 2**20, timeout: float = 600.0) -> None:
        from multiprocessing import shared_memory

        if bucket_bytes < 1 or not 1 <= num_readers <= MAX_READERS:
            raise ValueError(f"need bucket_bytes >= 1 and 1 <= num_readers <= {MAX_READERS} "
                             f"(got {bucket_bytes}, {num_readers})")
        self.bucket_bytes, self.num_readers = bucket_bytes, num_readers
        self.meta_bytes, self.timeout = meta_bytes, timeout
        self._data_offset = (HEADER_WORDS * 8 + meta_bytes + ALIGN - 1) // ALIGN * ALIGN
        self.block: Any = shared_memory.SharedMemory(create=True,
                                                     size=self._data_offset + bucket_bytes)
        self._views(self.block)
        self._epoch = 0
        self._idle = threading.Event()  # clear while ``send`` runs: ``close`` waits for it
        self._idle.set()

    def _views(self, block: Any) -> None:
        buf = torch.frombuffer(block.buf, dtype=torch.uint8)
        self._header = buf[: HEADER_WORDS * 8].view(torch.int64)
        self._meta = buf[HEADER_WORDS * 8 : HEADER_WORDS * 8 + self.meta_bytes]
        self._data = buf[self._data_offset :]

    def manifest(self, reader: int = 0) -> dict[str, Any]:
        """Start a new update (when ``reader == 0``) and describe it for receiver ``reader``."""
        if not 0 <= reader < self.num_readers:
            raise ValueError(f"reader must be in [0, {self.num_readers}) (got {reader})")
        if reader == 0:
            self._epoch += 1
            self._header.zero_()
            self._header[_EPOCH] = self._epoch
        return {"kind": self.kind, "block": self.block.name, "pid": os.getpid(),
                "epoch": self._epoch, "reader": reader, "meta_bytes": self.meta_bytes,
                "data_offset": self._data_offset, "bucket_bytes": self.bucket_bytes}

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Write the tensors bucket by bucket (blocking); returns the bytes sent.

        Each tensor is copied into the block as it arrives and then dropped, so the sender
        holds the block and the one tensor its source just yielded (two buckets at most when
        no tensor is larger than a bucket).

        Raises:
            WeightSyncError: a reader stopped early or did not keep up within the timeout
                (the stream is marked aborted).
        """
        bucket = _Bucket(self)
        self._idle.clear()
        try:
            for name, t in named_tensors:
                t = t.detach().cpu().contiguous()
                n = _nbytes(t)
                dtype, shape = str(t.dtype).removeprefix("torch."), list(t.shape)
                entry_meta = len(name.encode()) + 60 + 12 * len(shape)
                if bucket.entries and (bucket.offset + n > self.bucket_bytes
                                       or bucket.meta + entry_meta > self.meta_bytes):
                    bucket.publish()
                flat = t.reshape(-1).view(torch.uint8)
                del t
                if n > self.bucket_bytes:  # in pieces, one bucket each
                    for start in range(0, n, self.bucket_bytes):
                        bucket.add(name, dtype, shape, flat, start, entry_meta)
                        bucket.publish()
                else:
                    bucket.add(name, dtype, shape, flat, 0, entry_meta)
                del flat  # not held while the source makes the next tensor
            if bucket.entries:
                bucket.publish()
            self._wait_readers(bucket.published)
            self._header[_STATE] = _END
        except BaseException:
            self._header[_STATE] = _ABORTED
            raise
        finally:
            self._idle.set()
        return bucket.total

    def _wait_readers(self, published: int) -> None:
        acks = self._header[_ACK : _ACK + self.num_readers]

        def done() -> bool:
            if bool((acks < 0).any()):
                raise WeightSyncError("a receiver stopped before the update was complete")
            return bool((acks >= published).all())

        _wait(done, self.timeout, f"the receivers did not copy bucket {published}")

    def cancel(self) -> None:
        """Stop the update in flight from outside (e.g. the receiving process failed before it
        read anything): mark every reader stopped, so ``send`` raises ``WeightSyncError``."""
        if self.block is not None:
            self._header[_ACK : _ACK + self.num_readers] = -1

    def close(self) -> None:
        """Unlink the block (idempotent).

        A ``send`` running in another thread is stopped first (``cancel``: it raises
        ``WeightSyncError`` at its next bucket) and waited for, so the block is never unmapped
        under the sender.

        Raises:
            WeightSyncError: the sender did not stop within ``timeout`` seconds (its source is
                stuck); the block stays mapped, call ``close`` again later.
        """
        if self.block is not None:
            if not self._idle.is_set():
                self.cancel()
                if not self._idle.wait(self.timeout):
                    raise WeightSyncError(f"shared-memory weight transfer: close() waited "
                                          f"{self.timeout} s for the running send to stop")
            del self._header, self._meta, self._data
            self.block.close()
            self.block.unlink()
            self.block = None

    def __enter__(self) -> SharedMemoryTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def receive(self, manifest: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
        return receive_shared(manifest, timeout=self.timeout)


class _Bucket:
    """The bucket being filled in ``transport``'s block (sender side)."""

    def __init__(self, transport: SharedMemoryTransport) -> None:
        self.transport = transport
        self.entries: list[Any] = []
        self.offset = self.meta = self.published = self.total = 0

    def add(self, name: str, dtype: str, shape: list[int], flat: torch.Tensor, start: int,
            entry_meta: int) -> None:
        """Copy bytes ``[start, start + bucket_bytes)`` of ``flat`` (a tensor's bytes) in."""
        t = self.transport
        if not self.entries:  # the block is free once every reader copied the last bucket
            t._wait_readers(self.published)
        n = min(flat.numel() - start, t.bucket_bytes)
        t._data[self.offset : self.offset + n].copy_(flat[start : start + n])
        self.entries.append((name, dtype, shape, self.offset, n, start))
        self.offset = (self.offset + n + ALIGN - 1) // ALIGN * ALIGN
        self.meta += entry_meta
        self.total += n

    def publish(self) -> None:
        """Write the metadata and publish the bucket; the next ``add`` starts a new one."""
        t = self.transport
        meta = json.dumps(self.entries).encode()
        t._meta[: len(meta)].copy_(torch.frombuffer(bytearray(meta), dtype=torch.uint8))
        t._header[_META_LEN] = len(meta)
        self.published += 1
        t._header[_PUBLISHED] = self.published
        self.entries, self.offset, self.meta = [], 0, 0


def receive_shared(manifest: dict[str, Any], *, timeout: float = 600.0, borrow: bool = False,
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side: yield the tensors of one update, in order.

    Args:
        manifest: ``SharedMemoryTransport.manifest(reader)``.
        timeout: seconds to wait for each bucket.
        borrow: yield views into the block instead of copies: no allocation and one copy less,
            for a consumer that copies each tensor into its model before asking for the next
            (a view is valid only until then; keep none). The block is released for the next
            bucket when the consumer asks for the tensor after a bucket's last one.

    Raises:
        WeightSyncError: the sender aborted, the block is gone, the manifest belongs to an older
            update, or nothing arrived within ``timeout`` seconds.
    """
    from multiprocessing import resource_tracker, shared_memory

    try:
        block = shared_memory.SharedMemory(name=manifest["block"])
    except FileNotFoundError:
        raise WeightSyncError(f"no shared-memory block {manifest['block']!r}; the sender closed "
                              "it, or runs on another host (use the disk transport)") from None
    if manifest["pid"] != os.getpid():  # the sender owns the block: do not unlink it at exit
        resource_tracker.unregister(block._name, "shared_memory")  # type: ignore[attr-defined]
    return _read(block, manifest, timeout, borrow)


def _read(block: Any, manifest: dict[str, Any], timeout: float, borrow: bool,
          ) -> Iterator[tuple[str, torch.Tensor]]:
    buf = torch.frombuffer(block.buf, dtype=torch.uint8)
    header = buf[: HEADER_WORDS * 8].view(torch.int64)
    meta_area = buf[HEADER_WORDS * 8 : HEADER_WORDS * 8 + manifest["meta_bytes"]]
    data = buf[manifest["data_offset"] :]
    ack = _ACK + manifest["reader"]
    done, copied = False, 0
    pending: torch.Tensor | None = None  # the bytes of a tensor arriving in pieces
    try:
        if int(header[_EPOCH]) != manifest["epoch"]:
            raise WeightSyncError(f"stale shared-memory manifest (update {manifest['epoch']}, "
                                  f"the block holds update {int(header[_EPOCH])})")
        while True:
            (state,) = _wait(functools.partial(_poll, header, copied), timeout,
                             f"no bucket {copied + 1} arrived")
            if state == _ABORTED:
                raise WeightSyncError("the sender aborted the update; discard what was received")
            if int(header[_PUBLISHED]) == copied:  # state is END and everything is read
                done = True
                return
            entries = json.loads(bytes(meta_area[: int(header[_META_LEN])].numpy()))
            views, pending = _unpack(data, entries, pending)
            if borrow:
                yield from views
                del views
            else:
                bucket = [(name, view.clone()) for name, view in views]
                del views
            copied += 1
            header[ack] = copied  # the sender may rewrite the block from now on
            if not borrow:
                yield from bucket
                del bucket
    finally:
        if not done:
            header[ack] = -1
        del buf, header, meta_area, data
        with contextlib.suppress(BufferError):  # a borrowed view kept by the consumer
            block.close()


def _unpack(data: torch.Tensor, entries: list[Any], pending: torch.Tensor | None,
            ) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor | None]:
    """The bucket's whole tensors as views into ``data``, plus a tensor whose last piece this
    bucket holds (assembled in ``pending``, the bytes of the pieces so far)."""
    out = []
    for name, dtype, shape, off, n, start in entries:
        total = _size(dtype, shape)
        if start == 0 and n == total:
            out.append((name, _view(data, dtype, shape, off)))
            continue
        if start == 0:
            pending = torch.empty(total, dtype=torch.uint8)
        assert pending is not None and pending.numel() == total, "pieces out of order"
        pending[start : start + n].copy_(data[off : off + n])
        if start + n == total:
            out.append((name, pending.view(getattr(torch, dtype)).reshape(shape)))
            pending = None
    return out, pending


def _size(dtype: str, shape: list[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _view(data: torch.Tensor, dtype: str, shape: list[int], offset: int) -> torch.Tensor:
    dt = getattr(torch, dtype)
    n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
    return data[offset : offset + n].view(dt).reshape(shape)
