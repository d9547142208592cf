"""Optimizer helpers for Archon: LR schedules and the global grad-norm over sharded gradients."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..schedules import lr_lambda

__all__ = ["full_tensor", "global_grad_sq", "lr_lambda"]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor (collective for a ``DTensor``: call on every rank)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _sum_sq(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squared entries of plain tensors (one fused ``_foreach_norm`` call)."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm([t.float() for t in tensors])
    return torch.stack(norms).pow(2).sum()


def global_grad_sq(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squared gradient entries over every shard of every (D)Tensor.

    Plain tensors and replicated DTensors count locally; sharded DTensors are summed over the
    groups of their sharded mesh dims with one all-reduce per (mesh, dims) set; ``Partial``
    gradients (e.g. head-sharded q/k norms under TP) are reduced by DTensor itself.
    """
    sq = torch.zeros((), device=device)
    local: list[torch.Tensor] = []
    sharded: dict[tuple, tuple[list, list[torch.Tensor]]] = {}
    for g in grads:
        if not isinstance(g, DTensor):
            local.append(g)
        elif any(pl.is_partial() for pl in g.placements):
            sq = sq + full_tensor(torch.linalg.vector_norm(g.float())).pow(2)
        else:
            dims = tuple(i for i, pl in enumerate(g.placements) if pl.is_shard())
            if not dims:
                local.append(g.to_local())
                continue
            key = (id(g.device_mesh), dims)
            groups, parts = sharded.setdefault(key, ([g.device_mesh.get_group(i) for i in dims], []))
            parts.append(g.to_local())
    sq = sq + _sum_sq(local, device)
    for groups, parts in sharded.values():
        acc = _sum_sq(parts, device)
        for group in groups:
            dist.all_reduce(acc, group=group)
        sq = sq + acc
    return sq


def clip_grads(grads: list[torch.Tensor], max_norm: float, device: torch.device, pp_group=None) -> float:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm`` (``<= 0``:
    no clipping). ``pp_group`` adds the other pipeline stages' gradients. Returns the norm
    before clipping (``inf``/``nan`` when a gradient is not finite; nothing is scaled then)."""
    sq = global_grad_sq(grads, device)
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    total = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(total) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        if any(isinstance(g, DTensor) for g in grads):
            for g in grads:
                g.mul_(coef)
        else:
            torch._foreach_mul_(grads, coef)
    return total
