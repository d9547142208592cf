"""Pipeline parallelism for Archon with ``torch.distributed.pipelining``.

The model's layers are split into contiguous stages; each rank owns one stage (``1F1B``) or two
(``Interleaved1F1B``/``InterleavedZeroBubble`` in loop order, ``ZBVZeroBubble`` in V order: rank
r holds stages r and 2*pp-1-r). Stage modules are light shells sharing the parameters of one
per-rank model (global names, e.g. ``layers.3.attention.wq.weight``) that the optimizer, grad
clipping and DCP checkpoints use. The loss runs on the last stage: it turns the final hidden
states into log-probs with the LM head and calls the algorithm's ``LossFn`` per micro-batch.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import fields

import torch
import torch.distributed as dist
from torch import nn

from areal_agents.errors import ConfigError
from areal_agents.samples import TokenBatch
from areal_agents.trainers.base import LossFn
from areal_agents.trainers.lm_head import head_operands
from areal_agents.trainers.logprobs import RowSampling, sequence_logprobs

from .models.qwen3 import rope_cos_sin
from .optim import contiguous_grads
from .parallelize import apply_ac, apply_compile

SCHEDULES = {"1F1B": "single", "Interleaved1F1B": "loop", "ZBVZeroBubble": "v",
             "InterleavedZeroBubble": "loop"}


def stage_ids(schedule: str, pp_rank: int, pp: int) -> list[int]:
    """Global stage indices owned by ``pp_rank`` under ``schedule``."""
    style = SCHEDULES[schedule]
    if style == "single":
        return [pp_rank]
    if style == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank, pp_rank + pp]


def layer_split(n_layers: int, n_stages: int, counts: list[int] | None = None) -> list[range]:
    """Contiguous layer ranges per stage: ``counts[s]`` layers for stage ``s`` when given (a
    stage may hold none, e.g. a last stage with only the norm and LM-head loss), else as
    even as possible (earlier stages get extras).

    Raises:
        ConfigError: fewer layers than stages, or ``counts`` of the wrong length/sum.
    """
    if counts is not None:
        if len(counts) != n_stages or sum(counts) != n_layers or min(counts) < 0:
            raise ConfigError(f"pp_stage_layers={counts} must list {n_stages} non-negative layer "
                              f"counts (one per stage) that sum to n_layers={n_layers}")
        starts = [sum(counts[:s]) for s in range(n_stages)]
        return [range(a, a + c) for a, c in zip(starts, counts, strict=True)]
    if n_layers < n_stages:
        raise ConfigError(f"{n_layers} layers cannot fill {n_stages} pipeline stages; use fewer stages")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class StageModule(nn.Module):
    """One pipeline stage: optional embeddings, a slice of blocks, optional final norm.
    ``forward(tokens or hidden) -> hidden`` (normed on the last stage)."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        self.norm = model.norm if last else None
        self.output = model.output if last else None  # used by the loss, not in forward
        self.register_buffer("inv_freq", model.inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        cos, sin = rope_cos_sin(self.inv_freq, h.shape[1], h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return self.norm(h) if self.norm is not None else h


class _HeadOnce(torch.autograd.Function):
    """The shared chunked log-prob head (``sequence_logprobs``) as one autograd node whose
    backward computes the hidden and the LM-head weight gradients together exactly once.

    Zero-bubble schedules split backward into an input pass and a later weight pass that
    re-runs, from the saved output gradients, every node joining the weights to the stage
    input. Built-in ops compute only the gradient each pass needs, but the head's custom
    backward always does its whole (logits recompute + two matmuls) work, so it would run
    twice. Here the second call with the same output gradients returns the cached result.
    """

    @staticmethod
    def forward(ctx, hidden, weight, input_ids, attention_mask, sampling):  # type: ignore[override]
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(hidden.requires_grad)
            w = weight.detach().requires_grad_(weight.requires_grad)
            lp, ent = sequence_logprobs(h, w, input_ids, attention_mask, sampling)
        ctx.inner = (h, w, lp, ent)
        ctx.cache = None
        ctx.set_materialize_grads(False)
        return lp.detach(), ent.detach()

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):  # type: ignore[override]
        key = tuple(None if g is None else (g.data_ptr(), g._version) for g in (grad_lp, grad_ent))
        if ctx.cache is None or ctx.cache[0] != key:
            h, w, lp, ent = ctx.inner
            pairs = [(o, g) for o, g in ((lp, grad_lp), (ent, grad_ent)) if g is not None]
            wants = [t for t in (h, w) if t.requires_grad]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wants, [g for _, g in pairs],
                                             allow_unused=True)
                         if pairs and wants else ())
            ctx.cache = (key, tuple(next(grads, None) if t.requires_grad else None for t in (h, w)))
        gh, gw = ctx.cache[1]
        return gh, gw, None, None, None


def _rows(batch: TokenBatch, idx: torch.Tensor) -> TokenBatch:
    """Rows ``idx`` of every tensor field, keeping the full padded width."""
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        out[f.name] = v[idx] if isinstance(v, torch.Tensor) else v
    return TokenBatch(**out)


def _pad_rows(batch: TokenBatch, multiple: int, width_multiple: int = 16) -> TokenBatch:
    """Pad to a row count divisible by ``multiple`` with fully masked rows (zero loss weight)
    and to a width divisible by ``width_multiple`` (fewer distinct pipeline shapes)."""
    b, t = batch.input_ids.shape
    rows = -b % multiple
    width = -t % width_multiple
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            if v.dim() == 2 and width:
                v = torch.cat([v, torch.zeros(v.shape[0], width, dtype=v.dtype, device=v.device)], 1)
            if rows:
                v = torch.cat([v, torch.zeros((rows, *v.shape[1:]), dtype=v.dtype, device=v.device)], 0)
        out[f.name] = v
    return TokenBatch(**out)


class PipelineRunner:
    """Owns the stages and schedules of an ``ArchonEngine`` with ``pp > 1``.

    Raises:
        ConfigError: unknown schedule, tied embeddings, MoE, or PP combined with dp/tp.
    """

    def __init__(self, engine, schedule: str, n_microbatches: int | None = None, *,
                 sequence_parallel: bool = False, activation_checkpoint: str = "none",
                 compile: bool | str = False, stage_layers: list[int] | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown pp_schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        dims, args = engine.dims, engine.args
        if dims.dp_enabled or dims.tp_enabled:
            raise ConfigError("pipeline parallelism is only supported alone (dp_shard=1, tp=1) for now")
        if args.tie_embeddings:
            raise ConfigError("pipeline parallelism needs untied embeddings (tie_embeddings=False): "
                              "the first and last stage would have to share the embedding weight")
        if args.is_moe:
            raise ConfigError("pipeline parallelism is not implemented for MoE models")
        mesh = dims.build_mesh(engine.device.type)
        self.group = mesh["pp"].get_group()
        self.pp, self.pp_rank = dims.pp, mesh["pp"].get_local_rank()
        self.schedule_name = schedule
        self.stage_ids = stage_ids(schedule, self.pp_rank, self.pp)
        self.n_stages = self.pp * len(self.stage_ids)
        self.n_microbatches = n_microbatches or self.n_stages
        self.device = engine.device
        self.dim = args.dim
        ranges = layer_split(args.n_layers, self.n_stages, stage_layers)
        keep = {i for s in self.stage_ids for i in ranges[s]}
        rank_model = copy.deepcopy(engine.model)  # TODO(perf): build on meta for large models
        for i in list(rank_model.layers.keys()):
            if int(i) not in keep:
                del rank_model.layers[i]
        self.has_first, self.has_last = 0 in self.stage_ids, self.n_stages - 1 in self.stage_ids
        if not self.has_first:
            rank_model.tok_embeddings = None
        if not self.has_last:
            rank_model.norm, rank_model.output = None, None
        apply_ac(rank_model, activation_checkpoint)  # type: ignore[arg-type]
        if compile:
            apply_compile(rank_model, "inductor" if compile is True else compile)
        self.stages = [StageModule(rank_model, ranges[s], s == 0, s == self.n_stages - 1)
                       for s in self.stage_ids]
        self.last_stage_rank = dist.get_global_rank(self.group, self._owner(self.n_stages - 1))
        self.model = rank_model
        engine.model = rank_model
        engine.module = rank_model
        self._schedules: dict[tuple, object] = {}
        self._ctx: dict = {}

    def _owner(self, stage: int) -> int:
        for r in range(self.pp):
            if stage in stage_ids(self.schedule_name, r, self.pp):
                return r
        raise AssertionError(stage)

    def _schedule(self, shape: tuple[int, int]):
        """A schedule for micro-batches of ``shape`` (stages infer shapes once, so cache per shape)."""
        if shape not in self._schedules:
            from torch.distributed import pipelining as pl

            stages = [pl.PipelineStage(m, s, self.n_stages, self.device, group=self.group)
                      for m, s in zip(self.stages, self.stage_ids, strict=True)]
            cls = getattr(pl.schedules, f"Schedule{self.schedule_name}")
            arg = stages[0] if SCHEDULES[self.schedule_name] == "single" else stages
            self._schedules[shape] = cls(arg, self.n_microbatches, loss_fn=self._loss, scale_grads=False)
        return self._schedules[shape]

    def _loss(self, hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx
        mb = _rows(ctx["batch"], idx)
        hidden, weight = head_operands(self.model.output, hidden)
        lp, ent = _HeadOnce.apply(hidden, weight, mb.input_ids, mb.attention_mask,
                                  RowSampling.of(mb))
        loss, stats = ctx["loss_fn"](lp, ent, mb)
        # keyed by micro-batch: a schedule may evaluate the loss of a micro-batch more than once
        ctx["per_mb"][int(idx[0])] = {"loss": float(loss.detach()),
                                      **{k: float(torch.as_tensor(v).detach()) for k, v in stats.items()}}
        return loss

    def _run(self, batch: TokenBatch, loss_fn: LossFn) -> dict:
        padded = _pad_rows(batch, self.n_microbatches)
        rows = padded.input_ids.shape[0]
        self._ctx = {"batch": padded, "loss_fn": loss_fn, "per_mb": {}}
        schedule = self._schedule((rows // self.n_microbatches, padded.input_ids.shape[1]))
        target = torch.arange(rows, device=self.device)
        schedule.step(padded.input_ids, target=target, return_outputs=False)
        return self._ctx

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        """Forward/backward of every micro-batch by the schedule; stats from the last stage.

        Every gradient is contiguous on return (``optim.contiguous_grads``): the zero-bubble
        schedules' weight pass assigns gradients as autograd made them, possibly strided, and
        the fused AdamW step that follows would misread those."""
        per_mb = self._run(batch, loss_fn)["per_mb"]
        contiguous_grads(self.model.parameters())
        totals: dict[str, float] = defaultdict(float)
        for stats in per_mb.values():
            for k, v in stats.items():
                totals[k] += v
        box = [dict(totals)]
        dist.broadcast_object_list(box, src=self.last_stage_rank, group=self.group)
        return box[0]

    @torch.no_grad()
    def forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """Stage by stage over the whole batch with point-to-point sends (no schedule: the
        zero-bubble runtimes cannot run forward-only), then broadcast from the last stage."""
        for m in self.stages:
            m.eval()
        b, t = batch.input_ids.shape
        out = torch.zeros((b, t), dtype=torch.float32, device=self.device)
        dtype = next(self.model.parameters()).dtype
        h = batch.input_ids
        for s in range(self.n_stages):
            owner = self._owner(s)
            if owner != self.pp_rank:
                continue
            if s > 0 and self._owner(s - 1) != self.pp_rank:
                h = torch.empty((b, t, self.dim), dtype=dtype, device=self.device)
                dist.recv(h, src=dist.get_global_rank(self.group, self._owner(s - 1)), group=self.group)
            h = self.stages[self.stage_ids.index(s)](h)
            if s < self.n_stages - 1 and self._owner(s + 1) != self.pp_rank:
                dist.send(h.contiguous(), dst=dist.get_global_rank(self.group, self._owner(s + 1)), group=self.group)
        if self.has_last:
            h, weight = head_operands(self.model.output, h)
            out, _ = sequence_logprobs(h, weight, batch.input_ids,
                                       batch.attention_mask, RowSampling.of(batch))
        dist.broadcast(out, src=self.last_stage_rank, group=self.group)
        return out.cpu()

    def full_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every stage's tensors gathered on all ranks, in the unsplit model's order."""
        local = {n: t.detach().cpu() for n, t in self.model.state_dict().items()}
        gathered: list = [None] * self.pp
        dist.all_gather_object(gathered, local, group=self.group)
        merged = {k: v for part in gathered for k, v in part.items()}

        def order(name: str) -> tuple:
            if name.startswith("tok_embeddings"):
                return (0, 0, name)
            if name.startswith("layers."):
                return (1, int(name.split(".")[1]), name)
            return (2, 0, name)

        for name in sorted(merged, key=order):
            yield name, merged[name]
