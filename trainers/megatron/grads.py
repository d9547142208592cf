"""Gradient reduction and clipping for ``MegatronEngine`` (plain ``torch.distributed``).

megatron's own ``DistributedDataParallel`` and optimizers need CUDA (``_ParamAndGradBuffer``
allocates its buffers on ``torch.cuda.current_device()``); these functions do the same
reductions on any device for a plain ``torch.optim`` optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from areal_agents.trainers.megatron.convert import tp_split_dim


def finalize_grads(named: Sequence[tuple[str, nn.Parameter]], tp_group: dist.ProcessGroup | None,
                   dp_group: dist.ProcessGroup | None) -> None:
    """Sum q/k-norm grads over TP (each rank normalised only its own heads; megatron's
    ``finalize_model_grads`` does the same) and every grad over DP (``None``: no such group)."""
    if tp_group is not None:
        for name, p in named:
            if ("q_layernorm" in name or "k_layernorm" in name) and p.grad is not None:
                dist.all_reduce(p.grad, group=tp_group)
    if dp_group is not None:
        grads = [p.grad for _, p in named if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=dp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grads(named: Sequence[tuple[str, nn.Parameter]], max_norm: float, tp_rank: int,
               tp_group: dist.ProcessGroup | None) -> float:
    """The global grad norm (TP-replicated parameters counted once), then clip in place as
    ``torch.nn.utils.clip_grad_norm_`` does (``max_norm <= 0``: report only). Returns the norm
    before clipping (``inf``/``nan`` when not finite; grads are then left alone)."""
    grads = [p.grad for _, p in named if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for name, p in named:
        if p.grad is not None and (tp_split_dim(name) is not None or tp_rank == 0):
            sq += p.grad.float().pow(2).sum()
    if tp_group is not None:
        dist.all_reduce(sq, group=tp_group)
    norm = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(norm):
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm
