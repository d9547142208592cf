"""``WeightSlots``: a one-process train worker's weights after each step, in two shared-memory
slots the controller owns, so a weight push reads them without a pipe.

The block is a file both processes map (in ``/dev/shm`` where there is one, so it stays in
memory; no ``multiprocessing`` resource tracker, which would count a worker's attach as its
own). The controller (``WorkerGroupEngine``) creates it (two slots of ``slot_bytes``) and names
a slot in each train call (``SlotTarget``: the slot of that step's parity); the worker, right
after its optimizer step and before it answers, packs its exported weights into that slot
(``SlotWriter.write``: the ``tensor_pack`` layout) and answers with the entries, and the
controller reads them as views of the slot (``WeightSlots.read``). The other slot still holds
the previous step's weights, so views of one step stay valid until the train call after the
next one writes their slot (a push is done long before: the Trainer awaits it before the next
train step). The controller removes the block's file once the worker has mapped it
(``unlink``), so a killed run leaves nothing in ``/dev/shm``.

Example:
    >>> import torch
    >>> slots = WeightSlots(slot_bytes=64)
    >>> writer = SlotWriter()
    >>> entries = writer.write(slots.target(step=1), [("w", torch.arange(3.0))])
    >>> [(n, t.tolist()) for n, t in slots.read(slots.target(1), entries).unpack()]
    [('w', [0.0, 1.0, 2.0])]
    >>> writer.write(slots.target(2), [("big", torch.zeros(64))]) is None  # does not fit
    True
    >>> writer.close(); slots.close()
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .tensor_pack import Entry, PackedTensors, pack_into

__all__ = ["SlotTarget", "SlotWriter", "WeightSlots"]


@dataclass(frozen=True)
class SlotTarget:
    """Where the worker writes one step's weights: slot ``slot`` (0 or 1) of the block file
    ``block``."""

    block: str
    slot: int
    slot_bytes: int


class WeightSlots:
    """Controller side: the shared-memory block of two weight slots (owned: ``close``
    unlinks it).

    Args:
        slot_bytes: bytes per slot (the packed weights must fit one).
    """

    def __init__(self, slot_bytes: int) -> None:
        if slot_bytes < 1:
            raise ValueError(f"slot_bytes must be >= 1, got {slot_bytes}")
        self.slot_bytes = slot_bytes
        shm = "/dev/shm"
        fd, self._path = tempfile.mkstemp(prefix="weight-slots-",
                                          dir=shm if os.path.isdir(shm) else None)
        try:
            os.ftruncate(fd, 2 * slot_bytes)
            self._map: mmap.mmap | None = mmap.mmap(fd, 2 * slot_bytes)
            self._linked = True
        except BaseException:
            os.unlink(self._path)
            raise
        finally:
            os.close(fd)

    def target(self, step: int) -> SlotTarget:
        """The slot train step ``step``'s weights go to (by its parity)."""
        return SlotTarget(self._path, step % 2, self.slot_bytes)

    def read(self, target: SlotTarget, entries: list[Entry]) -> PackedTensors:
        """The weights the worker wrote to ``target`` (views of the slot, no copy)."""
        data = np.frombuffer(self._map, dtype=np.uint8, count=self.slot_bytes,
                             offset=target.slot * self.slot_bytes)
        return PackedTensors(entries, data)

    def unlink(self) -> None:
        """Remove the block's file once the worker has mapped it (idempotent): both mappings
        stay, and nothing is left behind if either process dies."""
        if self._linked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._linked = False

    def close(self) -> None:
        """Unmap and remove the block (idempotent); its memory goes once no view of it is
        left."""
        if self._map is not None:
            with contextlib.suppress(BufferError):  # views still alive: unmapped with them
                self._map.close()
            self._map = None
        self.unlink()


class SlotWriter:
    """Worker side: writes weights into the controller's slots (attached once per block)."""

    def __init__(self) -> None:
        self._blocks: dict[str, mmap.mmap] = {}

    def write(self, target: SlotTarget,
              named: Iterable[tuple[str, torch.Tensor]]) -> list[Entry] | None:
        """Pack ``named`` into ``target``'s slot; its entries, or ``None`` when they do not
        fit (the slot is then left partly written: the controller falls back to asking)."""
        flat = torch.frombuffer(self._attach(target.block), dtype=torch.uint8)
        start = target.slot * target.slot_bytes
        return pack_into(named, flat[start:start + target.slot_bytes])

    def _attach(self, path: str) -> mmap.mmap:
        if path not in self._blocks:
            for old in list(self._blocks):  # the controller made a new block: drop the old
                with contextlib.suppress(BufferError):
                    self._blocks.pop(old).close()
            with open(path, "r+b") as f:
                self._blocks[path] = mmap.mmap(f.fileno(), 0)
        return self._blocks[path]

    def close(self) -> None:
        """Unmap every block (idempotent)."""
        for block in self._blocks.values():
            with contextlib.suppress(BufferError):
                block.close()
        self._blocks.clear()
