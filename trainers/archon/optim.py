"""Optimizer helpers for Archon: LR schedules, the global grad-norm over sharded gradients and
contiguous gradients for the fused optimizer step."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..schedules import lr_lambda

__all__ = ["contiguous_grads", "full_tensor", "global_grad_sq", "lr_lambda"]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor (collective for a ``DTensor``: call on every rank)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def contiguous_grads(params: Iterable[torch.Tensor]) -> int:
    """Replace every non-contiguous ``.grad`` of ``params`` by a contiguous copy (same values);
    contiguous gradients are left as they are (the same tensor objects). Returns how many were
    copied.

    Why: autograd's accumulation copies a gradient into its parameter's layout, but the
    zero-bubble pipeline schedules assign the weight pass's gradients to ``param.grad``
    themselves, as autograd returned them, and a gradient that reaches a parameter through
    ``cat`` (a column slice of the joined tensor's gradient) or a transpose is strided. The fused
    AdamW step reads every gradient as if contiguous (such a gradient got another entry's update:
    half of a LoRA LM-head ``B`` moved the wrong way). Call this between the last backward and
    the optimizer step (``PipelineRunner.train_step``).

    A ``DTensor`` gradient is checked and copied by its local tensor: its global strides can
    read contiguous while the local shard the optimizer steps is not.
    """
    copied = 0
    for p in params:
        g = p.grad
        if g is None or (g.to_local() if isinstance(g, DTensor) else g).is_contiguous():
            continue
        p.grad = torch.empty_like(g, memory_format=torch.contiguous_format).copy_(g)
        copied += 1
    return copied


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
