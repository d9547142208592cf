"""``NCCLTransport``: broadcast weights bucket by bucket over a process group (NCCL or gloo).

The awex/AReaL-style path: one process group holds the rank that sends (``src``) and the
engine ranks that receive. Each bucket is two broadcasts, a JSON metadata message (its length,
then its bytes) and the data, packed into one flat byte buffer::

    src:        message(["bucket", [(name, dtype, shape, offset), ...], nbytes])
                broadcast(buffer[:nbytes])                     ... per bucket ...
                message(["end", total_bytes, 0])   (or ["abort", reason, 0])
    receivers:  the same calls; slice, copy out and yield each tensor

Only ``ProcessGroup.broadcast`` is used, so the same code runs on gloo (CPU tensors; what the
tests run) and NCCL (CUDA tensors), on the default group or on a standalone group from
``join_group`` (a ``TCPStore`` plus a ``ProcessGroupGloo``/``ProcessGroupNCCL`` built
directly: no default group is created or needed, so a process that already has one, e.g. a
worker-group rank, can join a weight-update group too).

Every rank of the group must take part in every update: a receiver whose consumer stops early
keeps receiving (and drops) the rest, so the group stays usable; a sender whose tensor source
fails broadcasts an abort. A failed collective (a peer died, the group's timeout passed)
raises ``WeightSyncError`` and leaves the group ``broken``: join a new one.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist

from areal_agents.errors import WeightSyncError

from .weight_sync import DEFAULT_BUCKET_BYTES, tensor_bytes

__all__ = ["GroupBackend", "NCCLTransport", "join_group"]

ALIGN = 64
PADDING = 8 * ALIGN  # room for alignment in the bucket buffer; a bucket that needs more
# closes early
GroupBackend = Literal["gloo", "nccl"]


def join_group(host: str, port: int, rank: int, world_size: int, *,
               backend: GroupBackend = "gloo", timeout_s: float = 120.0) -> Any:
    """Join a standalone process group (rank 0 hosts its ``TCPStore`` on ``host:port``).

    Blocks until all ``world_size`` ranks have joined (every rank calls this concurrently).
    NCCL ranks must have selected their CUDA device first (``torch.cuda.set_device``).

    Args:
        host, port: the store's address (rank 0 binds it; use a free port).
        rank, world_size: this process's rank in the group and the group's size.
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors).
        timeout_s: the store's wait for the other ranks and every collective's timeout.

    Returns:
        The ``ProcessGroup`` (pass it to ``NCCLTransport``).

    Raises:
        WeightSyncError: the other ranks did not join within ``timeout_s`` (or the store's
            port was taken).
        ValueError: an unknown ``backend``.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}; choose 'gloo' (CPU) or 'nccl' (CUDA)")
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=False)
        store = dist.PrefixStore("areal_agents/weights", store)
        if backend == "gloo":
            return dist.ProcessGroupGloo(store, rank, world_size, timeout)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    except (RuntimeError, OSError) as exc:
        raise WeightSyncError(f"could not join the weight-update group at {host}:{port} as rank "
                              f"{rank} of {world_size} ({backend}) within {timeout_s:g} s: "
                              f"{exc}") from exc


class NCCLTransport:
    """Weights over a process group: ``send`` on rank ``src``, ``receive`` on every other rank.

    Args:
        group: a ``ProcessGroup`` (``join_group``'s); None: the default group.
        src: the sending rank (in ``group``).
        bucket_bytes: the most tensor bytes per broadcast (a larger tensor goes alone).
        device: where the flat buffer lives: ``"cuda"`` for NCCL, ``"cpu"`` for gloo
            (None: ``cuda`` on an NCCL group, else ``cpu``).

    Raises:
        RuntimeError: ``group`` is None and there is no default group.
    """

    kind = "nccl"

    def __init__(self, group: Any = None, *, src: int = 0,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: str | None = None) -> None:
        if group is None:
            if not dist.is_initialized():
                raise RuntimeError("NCCLTransport needs a group (join_group) or "
                                   "torch.distributed.init_process_group first")
            group = dist.group.WORLD
        self.group, self.src, self.bucket_bytes = group, src, bucket_bytes
        if device is None:
            device = "cuda" if group.name() == "nccl" else "cpu"
        self.device = torch.device(device)
        self.broken = False  # a collective failed: the group is unusable
        self._buffer: torch.Tensor | None = None

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "src": self.src, "bucket_bytes": self.bucket_bytes}

    def _buf(self, nbytes: int) -> torch.Tensor:
        """The reused buffer (``bucket_bytes`` + alignment room), or a one-off for a larger
        tensor."""
        if nbytes > self.bucket_bytes + PADDING:  # one oversized tensor: a one-off buffer
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if self._buffer is None or self._buffer.numel() < nbytes:
            size = max(nbytes, self.bucket_bytes + PADDING)
            self._buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        return self._buffer[:nbytes]

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.broken:
            raise WeightSyncError("the weight-update group failed earlier; join a new one")
        options = dist.BroadcastOptions()
        options.rootRank = self.src
        try:
            self.group.broadcast([tensor], options).wait()
        except RuntimeError as exc:  # DistBackendError, gloo's "Connection closed", timeouts
            self.broken = True
            raise WeightSyncError(f"a broadcast of the weight-update group failed (a peer "
                                  f"died or timed out): {exc}") from exc

    def _object(self, obj: list[Any]) -> list[Any]:
        """Broadcast a 3-item JSON message (receivers pass a placeholder of 3 items)."""
        sending = self.group.rank() == self.src
        data = json.dumps(obj).encode() if sending else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        self._broadcast(length)
        payload = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
                   if sending else torch.empty(int(length.item()), dtype=torch.uint8,
                                               device=self.device))
        self._broadcast(payload)
        return obj if sending else json.loads(payload.cpu().numpy().tobytes())

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Broadcast the tensors (rank ``src`` only); returns the bytes sent.

        Each tensor is copied into the bucket buffer as it comes (a bucket is sent when the
        next tensor would take it past ``bucket_bytes``), and a tensor larger than a bucket is
        broadcast from its own memory, so the sender holds one buffer of ``bucket_bytes`` and
        one exported tensor at a time.

        Raises:
            RuntimeError: called on a rank other than ``src``.
            WeightSyncError: a broadcast failed (the group is ``broken``).
            Exception: whatever the tensor source raised (the receivers get an abort first).
        """
        if self.group.rank() != self.src:
            raise RuntimeError(f"send runs on rank {self.src} (this is rank {self.group.rank()})")
        total = size = end = 0
        entries: list[tuple[str, str, list[int], int]] = []
        buf = self._buf(self.bucket_bytes + PADDING)
        try:
            for name, tensor in named_tensors:
                n = tensor_bytes(tensor)
                flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                meta = (name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
                del tensor
                start = (end + ALIGN - 1) // ALIGN * ALIGN
                if entries and (size + n > self.bucket_bytes or start + n > buf.numel()):
                    self._send_bucket(entries, buf[:end])
                    entries, size, start = [], 0, 0
                if n > self.bucket_bytes:  # alone, from its own memory
                    self._send_bucket([(*meta, 0)], flat.to(self.device))
                    end = 0
                else:
                    buf[start : start + n].copy_(flat, non_blocking=True)
                    entries.append((*meta, start))
                    size, end = size + n, start + n
                total += n
                del flat
            if entries:
                self._send_bucket(entries, buf[:end])
        except BaseException as exc:
            if not self.broken:
                self._object(["abort", repr(exc), 0])
            raise
        self._object(["end", total, 0])
        return total

    def _send_bucket(self, entries: list[Any], data: torch.Tensor) -> None:
        self._object(["bucket", entries, data.numel()])
        self._broadcast(data)

    def receive(self, manifest: dict[str, Any] | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Receive one update (ranks other than ``src``); yields ``(name, tensor)`` in order,
        each a fresh tensor on ``device``.

        Raises:
            WeightSyncError: the sender aborted (discard what was received), or a broadcast
                failed (the group is ``broken``).
        """
        finished = False
        try:
            while True:
                msg = self._object([None, None, None])
                if msg[0] == "end":
                    finished = True
                    return
                if msg[0] == "abort":
                    finished = True
                    raise WeightSyncError(f"the sender aborted the update ({msg[1]}); discard "
                                          "what was received")
                _, entries, nbytes = msg
                buf = self._buf(nbytes)
                self._broadcast(buf)
                bucket = [(name, _unpack(buf, dtype, shape, off))
                          for name, dtype, shape, off in entries]
                del buf
                yield from bucket
                del bucket
        finally:
            if not finished and not self.broken:  # stopped early: stay in step, drop the rest
                self._drain()

    def _drain(self) -> None:
        while True:
            msg = self._object([None, None, None])
            if msg[0] != "bucket":
                return
            self._broadcast(self._buf(msg[2]))

    def close(self) -> None:
        """Drop the buffer (the group belongs to the caller)."""
        self._buffer = None


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _unpack(buf: torch.Tensor, dtype: str, shape: list[int], off: int) -> torch.Tensor:
    dt = getattr(torch, dtype)
    n = math.prod(shape) * _itemsize(dtype)
    return buf[off : off + n].view(dt).reshape(shape).clone()
