"""``pack_tensors``: named tensors packed into few flat byte messages, for a worker's pipe.

A worker group streams its exported weights to the controller over a pipe. One message per
tensor pays, per tensor, a pickle through ``torch.save`` (how a tensor's storage pickles) and
a pipe round of the controller's wait loop: for tiny:xs (24 tensors, 2 MiB) that was ~27 ms
of a ~33 ms weight push. Packed, a message is one flat ``uint8`` numpy array (it pickles as a
plain buffer copy) plus each tensor's name, dtype, shape and offset, and holds up to
``max_bytes`` of tensors (a larger tensor travels alone), so the receiver still holds one
message, not the model.

Example:
    >>> import torch
    >>> named = [("a", torch.arange(3.0)), ("b", torch.tensor([True, False]))]
    >>> packs = list(pack_tensors(named, max_bytes=1 << 20))
    >>> len(packs), [(n, t.tolist()) for p in packs for n, t in p.unpack()]
    (1, [('a', [0.0, 1.0, 2.0]), ('b', [True, False])])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ALIGN", "Entry", "PackedTensors", "pack_into", "pack_tensors"]

ALIGN = 16
"""Every tensor starts at a multiple of this many bytes in a pack (``Tensor.view(dtype)``
needs its offset to be a multiple of the element size)."""


Entry = tuple[str, torch.dtype, tuple[int, ...], int]
"""``(name, dtype, shape, offset)`` of one packed tensor."""


@dataclass
class PackedTensors:
    """Some named tensors in one flat byte buffer (one pipe message).

    Attributes:
        entries: ``(name, dtype, shape, offset)`` per tensor, in export order.
        data: the bytes, ``uint8``; tensor ``i`` starts at ``entries[i][3]``.
    """

    entries: list[Entry]
    data: np.ndarray

    def unpack(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in packing order; each tensor is a view of ``data`` (no copy)."""
        flat = torch.from_numpy(self.data)
        for name, dtype, shape, offset in self.entries:
            size = dtype.itemsize * _numel(shape)
            yield name, flat[offset:offset + size].view(dtype).reshape(shape)


def pack_tensors(named: Iterable[tuple[str, torch.Tensor]],
                 max_bytes: int) -> Iterator[PackedTensors]:
    """Pack ``(name, tensor)`` pairs, in order, into ``PackedTensors`` of at most
    ``max_bytes`` (plus alignment); a tensor larger than that is a pack of its own. Holds one
    pack and the tensor being read at a time.

    Raises:
        ValueError: ``max_bytes`` < 1.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > max_bytes:
            yield _pack(pending)
            pending, size = [], 0
        pending.append((name, t))
        size = _aligned(size) + nbytes
    if pending:
        yield _pack(pending)


def pack_into(named: Iterable[tuple[str, torch.Tensor]], out: torch.Tensor) -> list[Entry] | None:
    """Pack ``(name, tensor)`` pairs, in order, into the ``uint8`` buffer ``out`` (the
    ``PackedTensors`` layout: ``PackedTensors(entries, out.numpy())`` unpacks them); their
    entries, or ``None`` as soon as one does not fit (``out`` then holds a part).

    Example:
        >>> out = torch.empty(64, dtype=torch.uint8)
        >>> entries = pack_into([("a", torch.arange(3.0))], out)
        >>> [(n, t.tolist()) for n, t in PackedTensors(entries, out.numpy()).unpack()]
        [('a', [0.0, 1.0, 2.0])]
        >>> pack_into([("b", torch.zeros(17))], out) is None
        True
    """
    entries: list[Entry] = []
    offset = 0
    for name, tensor in named:
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if offset + raw.numel() > out.numel():
            return None
        out[offset:offset + raw.numel()] = raw
        entries.append((name, tensor.dtype, tuple(tensor.shape), offset))
        offset = _aligned(offset + raw.numel())
    return entries


def _pack(named: list[tuple[str, torch.Tensor]]) -> PackedTensors:
    entries, offset = [], 0
    for name, t in named:
        entries.append((name, t.dtype, tuple(t.shape), offset))
        offset = _aligned(offset + t.numel() * t.element_size())
    flat = torch.empty(offset, dtype=torch.uint8)
    for (_, _, _, start), (_, t) in zip(entries, named, strict=True):
        raw = t.reshape(-1).view(torch.uint8)
        flat[start:start + raw.numel()] = raw
    return PackedTensors(entries, flat.numpy())


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
