"""``MegatronEngine``: a Qwen2 / Qwen3 / Llama policy trained as a megatron-core ``GPTModel``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from areal_agents.errors import ConfigError
from areal_agents.samples import TokenBatch
from areal_agents.trainers.base import LossFn, TrainEngine
from areal_agents.trainers.logprobs import DEFAULT_CHUNK_SIZE, RowSampling, sequence_logprobs
from areal_agents.trainers.megatron.availability import require_megatron
from areal_agents.trainers.megatron.convert import (
    hf_tensors,
    megatron_names,
    megatron_tensor,
    shard,
    spec_from_hf_config,
    tp_split_dim,
    unshard,
)
from areal_agents.trainers.megatron.grads import clip_grads, finalize_grads
from areal_agents.trainers.megatron.hf_io import hf_source
from areal_agents.trainers.megatron.vocab_parallel import vocab_parallel_sequence_logprobs
from areal_agents.trainers.schedules import LRSchedule, check_lr_schedule, lr_lambda
from areal_agents.trainers.step import (
    accumulate_microbatches,
    plan_rank_microbatches,
    rank_microbatches,
    run_train_step,
)


class MegatronEngine(TrainEngine):
    """One trainable policy on megatron-core: a ``GPTModel`` converted from a HF causal LM.

    The HF weights are converted to megatron's layout (fused QKV grouped by KV head, fused
    gate/up ``linear_fc1``; see ``convert.py``) and split over ``tensor_parallel`` ranks with
    megatron's ``parallel_state``. Log-probs use the shared chunked math
    (``trainers/logprobs.py``) at TP=1 and its vocab-parallel counterpart
    (``vocab_parallel.py``: each rank computes its vocab columns, no gathered weight) at TP>1. The
    optimizer is ``torch.optim.AdamW`` on each rank's shards; gradients are summed over the
    data-parallel group (``world_size / tensor_parallel`` ranks, each training its share of the
    sequences) and the q/k-norm gradients over the TP group, as megatron's
    ``finalize_model_grads`` does; the clip norm counts TP-duplicated parameters once.

    With ``torch.distributed`` initialised every rank must call every method collectively with
    the *same full batch*; without it a one-process gloo group is started. Float32 only.

    Args:
        model_or_path: a ``transformers`` Qwen2 / Qwen3 / Llama causal LM, a HF checkpoint
            directory (safetensors, read tensor by tensor; sets ``self.tokenizer``) or a tiny
            spec such as ``"tiny:xs"``.
        lr, weight_decay, betas, max_grad_norm, warmup_steps, lr_schedule, total_steps,
        token_budget, chunk_size: as for ``FSDPEngine``.
        tensor_parallel: TP size (divides the world size, the heads and the KV heads).
        activation_checkpointing: recompute each decoder layer in the backward pass.
        lora: must be ``None`` (LoRA is not implemented on this backend).
        device: default ``cuda:<current>`` when available, else CPU.

    Raises:
        MegatronNotInstalled: megatron-core is missing (a ``ConfigError`` naming the install).
        ConfigError: unsupported architecture or options (see ``spec_from_hf_config``).
    """

    def __init__(
        self,
        model_or_path: nn.Module | str,
        *,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: float = 1.0,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
        total_steps: int | None = None,
        token_budget: int = 4096,
        tensor_parallel: int = 1,
        activation_checkpointing: bool = False,
        lora: Any = None,
        device: torch.device | str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        require_megatron()
        if lora is not None:
            raise ConfigError("LoRA is not supported by the megatron backend; use backend='archon' or 'fsdp'")
        check_lr_schedule(lr_schedule, total_steps)
        from megatron.core import parallel_state as ps

        from areal_agents.trainers.megatron import model as mc

        self._mc, self._ps = mc, ps
        self.hf_config, source, self.tokenizer = hf_source(model_or_path)
        self.spec = spec_from_hf_config(self.hf_config, tensor_parallel)  # before any group
        mc.init_parallel(tensor_parallel)
        self.tp, self.tp_rank = tensor_parallel, ps.get_tensor_model_parallel_rank()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        self.rank = dist.get_rank()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.max_grad_norm, self.token_budget, self.chunk_size = max_grad_norm, token_budget, chunk_size
        self.step = 0
        self.version = 0

        self.model = mc.build_gpt(self.spec, mc.transformer_config(self.spec, tensor_parallel))
        if activation_checkpointing:
            mc.checkpoint_layers(self.model)
        self._mark_tp_attributes()
        names = [n for n, _ in self.named_shards()]
        if names != megatron_names(self.spec):
            raise ConfigError(
                f"megatron-core built parameters {names[:4]}... that differ from the layout this "
                f"backend converts ({megatron_names(self.spec)[:4]}...); supported: megatron-core "
                ">=0.12,<0.17"
            )
        with torch.no_grad():  # one HF-derived tensor at a time, sliced to this rank
            for name, p in self.named_shards():
                p.copy_(shard(name, megatron_tensor(name, source, self.spec), self.tp_rank, self.tp))
        del source
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=betas,
                                           weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup_steps, lr_schedule, total_steps))

    # -- layout helpers ----------------------------------------------------------------------

    def named_shards(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(megatron name, this rank's parameter)`` in a fixed order."""
        yield from self.model.named_parameters()

    def _mark_tp_attributes(self) -> None:
        """Set megatron's ``tensor_model_parallel`` / ``partition_dim`` on split parameters.

        megatron sets them only inside its weight initialisers, which
        ``perform_initialization=False`` skips (the weights come from the HF checkpoint).
        """
        for name, p in self.named_shards():
            dim = tp_split_dim(name)
            p.tensor_model_parallel = dim is not None
            p.partition_dim = -1 if dim is None else dim
            p.partition_stride = 1

    def _gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The megatron *full* tensor of ``name`` from every TP rank's ``local`` (collective)."""
        if self.tp == 1 or tp_split_dim(name) is None:
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.contiguous(), group=self.tp_group)
        return unshard(name, parts)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Megatron *full* (TP=1 layout) parameters, detached (collective over TP)."""
        return {n: self._gather_full(n, p.detach()) for n, p in self.named_shards()}

    @torch.no_grad()
    def load_full_state(self, full: dict[str, torch.Tensor]) -> None:
        """Copy megatron *full* tensors into this rank's shards.

        Raises:
            KeyError: a parameter is missing from ``full``.
        """
        for name, p in self.named_shards():
            p.copy_(shard(name, full[name], self.tp_rank, self.tp))

    # -- forward -----------------------------------------------------------------------------

    def _forward(self, mb: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs, entropy)`` ``[b, t]`` under each row's sampling params."""
        sampling = RowSampling.of(mb)
        hidden = self._mc.hidden_states(self.model, mb.input_ids)
        weight = self._mc.lm_head_shard(self.model)
        if self.tp == 1:
            return sequence_logprobs(hidden, weight[: self.spec.vocab_size], mb.input_ids,
                                     mb.attention_mask, sampling, self.chunk_size)
        return vocab_parallel_sequence_logprobs(
            hidden, weight, mb.input_ids, mb.attention_mask, sampling, self.chunk_size,
            vocab_start=self.tp_rank * weight.shape[0], vocab_size=self.spec.vocab_size,
            group=self.tp_group)

    @torch.no_grad()
    def forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[B, T]`` float32 CPU log-probs of ``batch.input_ids`` under each row's sampling
        params (``batch.temperature``/``top_k``/``top_p``; see ``TrainEngine``).

        Collective: each data-parallel rank computes its share of the sequences (the same
        split as ``train_step``), the shares are summed over the DP group, and every rank
        returns the whole ``[B, T]`` tensor.
        """
        self.model.eval()
        batch = batch.to(self.device)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=self.device)
        for idx in self._local_plans(batch):
            lp, _ = self._forward(batch.select(torch.tensor(idx)))
            out[idx, : lp.shape[1]] = lp.float()
        if self.dp > 1:
            dist.all_reduce(out, group=self.dp_group)
        return out.cpu()

    # -- training ----------------------------------------------------------------------------

    def _local_plans(self, batch: TokenBatch) -> list[list[int]]:
        """This data-parallel rank's micro-batches (global row indices): every ``dp``-th
        sequence by length, packed under ``token_budget``."""
        return rank_microbatches(batch.attention_mask.sum(-1).tolist(), self.dp_rank, self.dp,
                                 self.token_budget)

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on ``batch`` (see ``TrainEngine``; the loop is
        ``trainers/step.py``); returns global stats.

        Raises:
            TrainError: the loss is not finite.
        """
        self.model.train()
        batch = batch.to(self.device)
        # Forward/backward only talk within the TP group (same plans), so DP ranks may run
        # different micro-batch counts (no count reduction: group=None); a rank without rows
        # still runs one zero-weighted micro-batch, so its stats and gradients exist for the
        # DP reductions. Gradients are summed over DP (``finalize_grads``): no grad_scale.
        slots = plan_rank_microbatches(batch.attention_mask.sum(-1).tolist(), self.dp_rank,
                                       self.dp, self.token_budget)
        out = run_train_step(
            lambda: accumulate_microbatches(batch, slots, self._forward, loss_fn,
                                            group=self.dp_group if self.dp > 1 else None,
                                            device=self.device),
            optimizer=self.optimizer, scheduler=self.scheduler,
            clip_grad_norm=self.clip_grad_norm, num_tokens=batch.num_tokens, step=self.step)
        self.step += 1
        return out

    def clip_grad_norm(self) -> float:
        """Reduce the gradients as megatron's ``finalize_model_grads`` does (q/k norms over
        TP, everything over DP), then clip them to ``max_grad_norm``; returns the norm before
        clipping (collective)."""
        named = list(self.named_shards())
        finalize_grads(named, self.tp_group if self.tp > 1 and self.spec.qk_norm else None,
                       self.dp_group if self.dp > 1 else None)
        return clip_grads(named, self.max_grad_norm, self.tp_rank,
                          self.tp_group if self.tp > 1 else None)

    # -- weights and checkpoints -------------------------------------------------------------

    def export_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, full CPU tensor)``; collective over TP, global rank 0 yields.

        Streams parameter by parameter (peak extra memory: one gathered tensor); every rank
        must drain the generator (the gathers happen as it advances). Tensors may alias the
        live parameters at TP=1: consume or copy them before the next ``train_step``. A tied
        model yields no ``lm_head.weight`` (as ``FSDPEngine``).
        """
        for name, p in self.named_shards():
            full = self._gather_full(name, p.detach())
            if self.rank != 0:
                continue
            for hf_name, t in hf_tensors(name, full, self.spec):
                t = t.cpu()
                yield hf_name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    def save(self, path: str) -> None:
        """Checkpoint model, optimizer, scheduler, RNG, step and version (collective)."""
        from areal_agents.trainers.megatron.checkpoint import save_checkpoint

        save_checkpoint(self, path)

    def load(self, path: str) -> None:
        """Restore ``save``'s checkpoint, also one written at another TP size (collective)."""
        from areal_agents.trainers.megatron.checkpoint import load_checkpoint

        load_checkpoint(self, path)

    def save_hf(self, path: str) -> None:
        """Write a ``transformers``-loadable checkpoint (config + safetensors) at ``path``.

        Collective; rank 0 writes.
        """
        from safetensors.torch import save_file

        weights = {n: t.contiguous().clone() for n, t in self.export_weights()}
        if self.rank == 0:
            import os

            os.makedirs(path, exist_ok=True)
            self.hf_config.save_pretrained(path)
            save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        dist.barrier()

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Megatron names -> this rank's parameters that the optimizer updates."""
        return dict(self.named_shards())

    def close(self) -> None:
        """Drop the model and optimizer (idempotent); process groups are left alone."""
        for attr in ("optimizer", "scheduler", "model"):
            self.__dict__.pop(attr, None)
