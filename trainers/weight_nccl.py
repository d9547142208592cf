"""``NCCLTransport``: broadcast weights bucket by bucket over a ``torch.distributed`` group.

The awex/AReaL-style path: one process group holds the training rank that sends (``src``) and
the engine ranks that receive. Each bucket is two collectives, a metadata message then the
data, packed into one flat byte buffer::

    src:        broadcast_object_list(["bucket", [(name, dtype, shape, offset), ...], nbytes])
                broadcast(buffer[:nbytes])                     ... per bucket ...
                broadcast_object_list(["end", total_bytes, 0])   (or ["abort", reason, 0])
    receivers:  the same calls; slice, copy out and yield each tensor

The code only uses ``torch.distributed`` collectives, so the same transport runs on gloo
(CPU tensors; what the tests run) and NCCL (CUDA tensors, ``device="cuda"``). Every rank of
the group must take part in every update: a receiver whose consumer stops early keeps
receiving (and drops) the rest, so the group stays usable; a sender that dies leaves the
receivers waiting until the group's timeout (``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from areal_agents.errors import WeightSyncError

from .weight_sync import DEFAULT_BUCKET_BYTES, buckets, tensor_bytes

ALIGN = 64


class NCCLTransport:
    """Weights over a process group: ``send`` on rank ``src``, ``receive`` on every other rank.

    Args:
        group: the process group (None: the default group).
        src: the global rank that sends.
        bucket_bytes: the most tensor bytes per broadcast (a larger tensor goes alone).
        device: where the flat buffer lives: ``"cuda"`` for NCCL, ``"cpu"`` for gloo
            (None: ``cuda`` on an NCCL group, else ``cpu``).
    """

    kind = "nccl"

    def __init__(self, group: Any = None, *, src: int = 0,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: str | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("NCCLTransport needs torch.distributed.init_process_group first")
        self.group, self.src, self.bucket_bytes = group, src, bucket_bytes
        if device is None:
            device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        self.device = torch.device(device)
        self._buffer: torch.Tensor | None = None

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "src": self.src, "bucket_bytes": self.bucket_bytes}

    def _buf(self, nbytes: int) -> torch.Tensor:
        if nbytes > 2 * self.bucket_bytes:  # one oversized tensor: a one-off buffer
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if self._buffer is None or self._buffer.numel() < nbytes:  # (alignment padding)
            size = max(nbytes, self.bucket_bytes)
            self._buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        return self._buffer[:nbytes]

    def _object(self, obj: list[Any]) -> list[Any]:
        """Broadcast a 3-item message (every rank must pass a list of the same length)."""
        dist.broadcast_object_list(obj, src=self.src, group=self.group,
                                   device=self.device if self.device.type == "cuda" else None)
        return obj

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Broadcast the tensors (rank ``src`` only); returns the bytes sent.

        Raises:
            RuntimeError: called on a rank other than ``src``.
            Exception: whatever the tensor source raised (the receivers get an abort first).
        """
        if dist.get_rank() != self.src:
            raise RuntimeError(f"send runs on rank {self.src} (this is rank {dist.get_rank()})")
        total = 0
        try:
            for bucket in buckets(named_tensors, self.bucket_bytes):
                entries, offset, nbytes = [], 0, 1
                for name, t in bucket:
                    entries.append((name, str(t.dtype).removeprefix("torch."), list(t.shape),
                                    offset))
                    nbytes = max(nbytes, offset + tensor_bytes(t))
                    offset = (offset + tensor_bytes(t) + ALIGN - 1) // ALIGN * ALIGN
                buf = self._buf(nbytes)
                for (_, _, _, off), (_, t) in zip(entries, bucket, strict=True):
                    n = tensor_bytes(t)
                    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
                    buf[off : off + n].copy_(flat, non_blocking=True)
                self._object(["bucket", entries, nbytes])
                dist.broadcast(buf, src=self.src, group=self.group)
                total += sum(tensor_bytes(t) for _, t in bucket)
        except BaseException as exc:
            self._object(["abort", repr(exc), 0])
            raise
        self._object(["end", total, 0])
        return total

    def receive(self, manifest: dict[str, Any] | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Receive one update (ranks other than ``src``); yields ``(name, tensor)`` in order,
        each a fresh tensor on ``device``.

        Raises:
            WeightSyncError: the sender aborted (discard what was received).
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
                dist.broadcast(buf, src=self.src, group=self.group)
                bucket = [(name, _unpack(buf, dtype, shape, off))
                          for name, dtype, shape, off in entries]
                del buf
                yield from bucket
                del bucket
        finally:
            if not finished:  # stopped early: stay in step with the sender, drop the rest
                self._drain()

    def _drain(self) -> None:
        while True:
            msg = self._object([None, None, None])
            if msg[0] != "bucket":
                return
            dist.broadcast(self._buf(msg[2]), src=self.src, group=self.group)

    def close(self) -> None:
        """Drop the buffer (the group belongs to the caller)."""
        self._buffer = None


def _unpack(buf: torch.Tensor, dtype: str, shape: list[int], off: int) -> torch.Tensor:
    dt = getattr(torch, dtype)
    n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
    return buf[off : off + n].view(dt).reshape(shape).clone()
