"""Qwen3-MoE sparse MLP for Archon: top-k softmax router, grouped experts, load-balancing loss,
and expert parallelism (experts split over ranks, tokens exchanged with all-to-all).

The dense parts of Qwen3-MoE are the ``qwen3.py`` blocks; ``TransformerBlock`` swaps its MLP for
``MoE`` on sparse layers (``ModelArgs.layer_is_moe``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as ``w1, w3 [E, H, D]`` and ``w2 [E, D, H]``.

    ``forward(x [n, D], counts [E_local])`` runs rows grouped by expert (rows of expert e are
    contiguous, ``counts[e]`` of them). Uses ``torch._grouped_mm`` on CUDA when available, else
    a loop of dense matmuls per expert (the CPU fallback).
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=0.02)

    def _local(self, w: torch.Tensor) -> torch.Tensor:
        return w.to_local() if hasattr(w, "to_local") else w  # EP: a Shard(0) DTensor

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self._local(self.w1), self._local(self.w2), self._local(self.w3)
        if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs))
            h = h * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
        outs = []
        for e, chunk in enumerate(torch.split(x, counts.tolist())):
            h = F.silu(chunk @ w1[e].t()) * (chunk @ w3[e].t())
            outs.append(h @ w2[e].t())
        return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


class MoE(nn.Module):
    """Sparse MLP: ``router`` scores experts (softmax in float32), the top-k are kept and,
    with ``norm_topk_prob``, renormalised to sum to 1 (the HF Qwen3-MoE rule); each token's
    output is the weighted sum of its experts' outputs. ``last_router_logits`` keeps
    ``[tokens, E]`` router logits of the last forward for the load-balancing loss.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_experts, self.top_k = args.num_experts, args.top_k
        self.norm_topk_prob = args.norm_topk_prob
        self.router = nn.Linear(args.dim, args.num_experts, bias=False)
        self.experts = GroupedExperts(args.num_experts, args.dim, args.moe_hidden_dim)
        self.ep_group = None  # set by apply_ep
        self.last_router_logits: torch.Tensor | None = None
        self.last_aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [n, D]
        logits = self.router(flat)  # [n, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)  # [n, k]
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        top_w = top_w.to(x.dtype)
        self.last_router_logits = logits
        expert_of = top_i.reshape(-1)  # [n*k]
        order = torch.argsort(expert_of, stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(expert_of, minlength=self.num_experts)
        routed = flat[token_of]  # [n*k, D] grouped by expert
        if self.ep_group is None:
            y = self.experts(routed, counts)
        else:
            y = _expert_parallel(self.experts, routed, counts, self.ep_group)
        y = y * top_w.reshape(-1)[order, None]
        out = torch.zeros_like(flat).index_add(0, token_of, y.to(flat.dtype))
        return out.reshape(shape)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style auxiliary loss over all sparse layers, as HF Qwen3-MoE computes it:
    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of top-k picks and ``P_e`` the mean router
    probability of expert e, both pooled over layers and tokens."""
    logits = torch.cat(router_logits, 0)  # [layers * n, E]
    probs = torch.softmax(logits.float(), dim=-1)
    _, picked = torch.topk(probs, top_k, dim=-1)
    counts = torch.zeros(num_experts, device=logits.device).index_add(
        0, picked.reshape(-1), torch.ones(picked.numel(), device=logits.device))
    f = counts / logits.shape[0]
    return num_experts * (f * probs.mean(0)).sum()


def _expert_parallel(experts: GroupedExperts, routed: torch.Tensor, counts: torch.Tensor, group) -> torch.Tensor:
    """Dispatch rows to the ranks owning their experts, compute, and combine (all-to-all)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_to_all_single

    ep = dist.get_world_size(group)
    e_local = counts.numel() // ep
    # counts[r * e_local + j]: rows this rank sends to expert j of rank r
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)  # [src * e_local + j]
    send_splits = counts.view(ep, e_local).sum(1).tolist()
    recv_matrix = recv_counts.view(ep, e_local)
    recv_splits = recv_matrix.sum(1).tolist()
    received = all_to_all_single(
        routed.new_empty(sum(recv_splits), routed.shape[1]), routed, recv_splits, send_splits, group=group)
    # received rows are ordered (source rank, local expert): regroup by local expert
    src_of = torch.arange(ep, device=routed.device).repeat_interleave(e_local)
    exp_of = torch.arange(e_local, device=routed.device).repeat(ep)
    keys = (exp_of * ep + src_of).repeat_interleave(recv_matrix.reshape(-1))
    perm = torch.argsort(keys, stable=True)
    y_sorted = experts(received[perm], recv_matrix.sum(0))
    y = torch.empty_like(y_sorted).index_copy(0, perm, y_sorted)
    return all_to_all_single(
        y.new_empty(routed.shape[0], y.shape[1]), y, send_splits, recv_splits, group=group)


def apply_ep(model: nn.Module, ep_mesh) -> list[nn.Parameter]:
    """Split every MoE layer's experts over ``ep_mesh`` (contiguous blocks of experts per rank)
    as ``Shard(0)`` DTensors, and route tokens with all-to-all. Returns the expert parameters
    (their gradients sum contributions of every rank's tokens).

    Raises:
        ValueError: the expert count is not divisible by the EP degree.
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    params = []
    for block in model.layers.values():
        if not getattr(block, "moe_enabled", False):
            continue
        moe = block.feed_forward
        if moe.num_experts % ep_mesh.size():
            raise ValueError(f"num_experts={moe.num_experts} is not divisible by ep={ep_mesh.size()}")
        moe.ep_group = ep_mesh.get_group()
        for name in ("w1", "w2", "w3"):
            p = nn.Parameter(distribute_tensor(getattr(moe.experts, name).data, ep_mesh, [Shard(0)]))
            setattr(moe.experts, name, p)
            params.append(p)
    return params
