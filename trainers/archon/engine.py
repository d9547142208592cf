"""``ArchonEngine``: a PyTorch-native Archon model as a ``TrainEngine`` (FSDP2/TP/PP/LoRA)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from areal_agents.errors import ConfigError
from areal_agents.samples import TokenBatch
from areal_agents.trainers.base import LossFn, TrainEngine
from areal_agents.trainers.logprobs import DEFAULT_CHUNK_SIZE, RowSampling
from areal_agents.trainers.microbatch import plan_microbatches
from areal_agents.trainers.schedules import LRSchedule, check_lr_schedule
from areal_agents.trainers.shared_prefix import RowPrompts
from areal_agents.trainers.step import (
    accumulate_microbatches,
    add_shared_prompt_stat,
    batch_prompts,
    loss_positions,
    plan_rank_microbatches,
    prompt_plan,
    run_train_step,
)

from .models import ModelArgs, Transformer, archon_to_hf
from .models.state_dict import ExpertLayout, serving_expert_layout
from .optim import clip_grads, full_tensor, lr_lambda
from .parallel_dims import ParallelDims, default_device
from .parallelize import ACMode, parallelize
from .policy import ArchonPolicyModule, build_model

__all__ = ["ArchonEngine", "ArchonPolicyModule", "build_model"]


class ArchonEngine(TrainEngine):
    """One trainable policy on the Archon backend.

    Single process by default. With ``torch.distributed`` initialised, ``ParallelDims``
    (``dp_shard * tp * pp == world size``) picks FSDP2 sharding, tensor parallelism and
    pipeline stages; all ranks call every method collectively with the *same full batch*
    (each data-parallel rank trains on its share of the sequences).

    Args:
        model: an Archon ``Transformer``, ``ModelArgs`` (random init), a ``transformers``
            causal LM of a supported family, or a HF checkpoint directory.
        lr, weight_decay, betas, eps, max_grad_norm, warmup_steps, lr_schedule, total_steps:
            AdamW and LR schedule (as ``FSDPEngine``).
        token_budget: maximum padded tokens per micro-batch.
        dp_shard, tp, pp, ep: parallel degrees (see ``ParallelDims``).
        pp_schedule: ``"1F1B"``, ``"Interleaved1F1B"``, ``"ZBVZeroBubble"`` or
            ``"InterleavedZeroBubble"``; ``pp_microbatches`` micro-batches per step;
            ``pp_stage_layers`` layers per stage in stage order (default: even split) to balance
            the last stage's extra LM-head/loss work.
        sequence_parallel: run norms on sequence shards under TP.
        activation_checkpoint: ``"none"``, ``"full"`` or ``"selective"``.
        compile: ``torch.compile`` each block (``True`` = inductor, or a backend name).
        pack: run the backbone on the real tokens only (no padding rows); ignored under TP
            and PP (their layouts need ``[B, T]`` activations).
        reshard_after_forward: FSDP2 re-gathers block weights for backward (``True``, least
            memory) or keeps them unsharded from forward to backward (``False``, half the
            all-gathers); ``None`` (default, as torchtitan) reshards all blocks but the last.
        fused_projections: one ``wqkv`` and one ``w13`` matmul per block; ``None`` fuses
            unless TP or LoRA is used (they need the per-projection layout). HF names and
            checkpoints are the same either way; DCP checkpoints follow the layout.
        lora: ``None``, a ``LoRAConfig`` or a dict of its fields; only adapters train.
        fp8: float8 linear layers via torchao (CUDA only).
        seed: initialisation seed when ``model`` is ``ModelArgs``.
        share_prompts: rows that start with the same prompt (a GRPO group) run it once per
            forward and micro-batches keep a group's rows together, as ``FSDPEngine``
            (``trainers/shared_prefix.py``; attention given the prompt's keys/values,
            ``models.qwen3.PromptKV``); on dense models without TP, PP, compile or activation
            checkpointing, where it saves >= 20% of a micro-batch's tokens.

    Raises:
        ConfigError: inconsistent parallel degrees or options.

    Example:
        >>> engine = ArchonEngine(ModelArgs(), lr=1e-3)  # doctest: +SKIP
        >>> engine.train_step(batch, loss_fn)["loss"]  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Transformer | ModelArgs | nn.Module | str,
        *,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_grad_norm: float = 1.0,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
        total_steps: int | None = None,
        token_budget: int = 4096,
        dp_shard: int = -1,
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        pp_schedule: str = "1F1B",
        pp_microbatches: int | None = None,
        pp_stage_layers: list[int] | None = None,
        sequence_parallel: bool = False,
        activation_checkpoint: ACMode = "none",
        compile: bool | str = False,
        pack: bool = True,
        reshard_after_forward: bool | None = None,
        fused_projections: bool | None = None,
        lora: Any = None,
        fp8: bool = False,
        device: torch.device | str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        seed: int = 0,
        share_prompts: bool = True,
    ) -> None:
        check_lr_schedule(lr_schedule, total_steps)
        if pp > 1 and compile and "ZeroBubble" in pp_schedule:
            raise ConfigError(f"compile cannot be used with pp_schedule={pp_schedule!r}: its split "
                              "backward (input, then weight gradients) needs the eager autograd "
                              "graph; compile with 1F1B/Interleaved1F1B or drop compile")
        self.device = torch.device(device) if device is not None else default_device()
        self.dims = ParallelDims(dp_shard=dp_shard, tp=tp, pp=pp, ep=ep)
        self.distributed = self.dims.world_size > 1
        if self.distributed:
            self.dims.build_mesh(self.device.type)
        self.rank = dist.get_rank() if self.distributed else 0
        self.dp_rank = self.dims.local_rank("dp_shard")
        self.max_grad_norm = max_grad_norm
        self.token_budget = token_budget
        self.step = 0
        self.version = 0

        if fused_projections is None:
            fused_projections = not self.dims.tp_enabled and lora is None
        elif fused_projections and (self.dims.tp_enabled or lora is not None):
            raise ConfigError("fused_projections=True cannot be combined with tp > 1 or LoRA "
                              "(they shard/adapt q, k, v and gate/up separately); leave it None")
        model = build_model(model, seed, fused_projections).to(self.device)
        self.args: ModelArgs = model.args
        self.lora_config = None
        if lora is not None:
            from .lora import apply_lora

            self.lora_config = apply_lora(model, lora)
        if fp8:
            from .fp8 import apply_fp8

            apply_fp8(model)
        self.model = model
        self.module = ArchonPolicyModule(model, chunk_size, pack=pack and not self.dims.tp_enabled)
        self.share_prompts = (share_prompts and not self.dims.tp_enabled
                              and not self.dims.pp_enabled and not self.args.is_moe
                              and not compile and activation_checkpoint == "none")
        self.shared_prompt_tokens = 0  # tokens the shared-prompt plans saved, over the run
        self.pipeline = None
        self.ep_params: list[nn.Parameter] = []
        if self.dims.pp_enabled:
            from .pipeline import PipelineRunner

            self.pipeline = PipelineRunner(self, pp_schedule, pp_microbatches,
                                           sequence_parallel=sequence_parallel,
                                           activation_checkpoint=activation_checkpoint,
                                           compile=compile, stage_layers=pp_stage_layers)
        else:
            if self.dims.ep_enabled:
                from .models.qwen3_moe import apply_ep

                if not self.args.is_moe:
                    raise ConfigError("ep > 1 needs a MoE model (num_experts > 0)")
                self.ep_params = apply_ep(model, self.dims.build_mesh(self.device.type)["dp_shard"])
            parallelize(model, self.module, self.dims, sequence_parallel=sequence_parallel,
                        activation_checkpoint=activation_checkpoint, compile=compile,
                        ignored_params=set(self.ep_params) or None,
                        reshard_after_forward=reshard_after_forward)
        if self.lora_config is not None:
            from .lora import freeze_non_adapters

            freeze_non_adapters(model)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters (check the LoRA target patterns)")
        # fused AdamW (one kernel for all tensors) unless DTensors of mixed meshes (TP/EP)
        mixed = self.dims.tp_enabled or self.dims.ep_enabled
        self.optimizer = torch.optim.AdamW(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            foreach=False if mixed else None, fused=None if mixed else True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup_steps, lr_schedule, total_steps)
        )

    # -- TrainEngine -------------------------------------------------------------------------

    def _forward(self, mb: TokenBatch,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs, entropy)`` ``[b, t]`` under each row's sampling params."""
        plan = prompt_plan(mb) if self.share_prompts else None
        self.shared_prompt_tokens += plan.saved_tokens if plan is not None else 0
        return self.module(mb.input_ids, mb.attention_mask, RowSampling.of(mb), positions, plan)

    def _train_forward(self, mb: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``_forward`` at the loss's positions only (``LossFn``: 0 elsewhere)."""
        return self._forward(mb, loss_positions(mb))

    def _prompts(self, batch: TokenBatch) -> RowPrompts | None:
        """Every row's prompt key when sharing prompts, else ``None`` (plan by length)."""
        return batch_prompts(batch) if self.share_prompts else None

    @torch.no_grad()
    def forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[B, T]`` float32 log-probs of ``batch.input_ids`` (CPU) under each row's sampling
        params (``batch.temperature``/``top_k``/``top_p``; see ``TrainEngine``)."""
        self.module.eval()
        batch = batch.to(self.device)
        if self.pipeline is not None:
            return self.pipeline.forward_logprobs(batch)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        lengths = batch.attention_mask.sum(-1).tolist()
        for idx in plan_microbatches(lengths, self.token_budget, self._prompts(batch)):
            mb = batch.select(torch.tensor(idx))
            lp, _ = self._forward(mb)
            out[idx, : lp.shape[1]] = lp.float().cpu()
        return out

    def _aux_loss(self, num_slots: int) -> torch.Tensor | None:
        """The MoE load-balancing loss of the last forward, weighted and divided by the
        micro-batch slots of all data-parallel ranks (``None`` for dense models)."""
        if not self.args.is_moe or self.args.router_aux_loss_coef == 0:
            return None
        aux = self.model.aux_loss()
        return None if aux is None else aux * self.args.router_aux_loss_coef / num_slots

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on ``batch`` (see ``TrainEngine``; the loop is
        ``trainers/step.py``, the pipeline schedule replaces its accumulation); returns
        global stats.

        Raises:
            TrainError: the loss is not finite.
        """
        self.module.train()
        batch = batch.to(self.device)
        if self.pipeline is not None:
            accumulate = partial(self.pipeline.train_step, batch, loss_fn)
        else:
            accumulate = partial(self._accumulate, batch, loss_fn)
        shared_before = self.shared_prompt_tokens
        out = run_train_step(accumulate, optimizer=self.optimizer, scheduler=self.scheduler,
                             clip_grad_norm=self.clip_grad_norm, num_tokens=batch.num_tokens,
                             step=self.step)
        self.step += 1
        if self.share_prompts:  # summed over the data-parallel ranks
            dp = self.dims.build_mesh()["dp_shard"].get_group() if self.dims.dp_enabled else None
            add_shared_prompt_stat(out, self.shared_prompt_tokens - shared_before, dp,
                                   self.device)
        return out

    def _accumulate(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        n = self.dims.dp_shard
        slots = plan_rank_microbatches(batch.attention_mask.sum(-1).tolist(), self.dp_rank, n,
                                       self.token_budget,
                                       group=dist.group.WORLD if self.distributed else None,
                                       device=self.device, prompts=self._prompts(batch))
        out = accumulate_microbatches(
            batch, slots, self._train_forward,
            loss_fn, grad_scale=n, aux_loss=partial(self._aux_loss, len(slots) * n),
            group=self.dims.build_mesh()["dp_shard"].get_group() if self.dims.dp_enabled else None,
            device=self.device)
        for p in self.ep_params:  # not averaged by FSDP: every rank's tokens added n * grad
            if p.grad is not None:
                p.grad.div_(n)
        return out

    def clip_grad_norm(self) -> float:
        """Clip all gradients to ``max_grad_norm`` (global L2 norm over every shard, stage
        and tensor-parallel rank); returns the norm before clipping."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        pp_group = self.dims.build_mesh()["pp"].get_group() if self.dims.pp_enabled else None
        return clip_grads(grads, self.max_grad_norm, self.device, pp_group)

    def full_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(archon_name, full tensor)`` of the model (collective; LoRA unmerged)."""
        if self.pipeline is not None:
            yield from self.pipeline.full_state_dict()
            return
        for name, t in self.model.state_dict().items():
            yield name, full_tensor(t)

    def export_weights(self, merge_lora: bool = True, dtype: torch.dtype | None = None,
                       experts: ExpertLayout | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, full CPU tensor)``; collective when distributed, rank 0 yields.

        Args:
            merge_lora: with LoRA, yield base weights with ``W + scaling * B @ A`` merged;
                ``False`` yields only the adapter with PEFT adapter-file names.
            dtype: cast floating tensors to this dtype (default: as trained).
            experts: MoE expert layout (``archon.models.state_dict``); ``None`` is that of the
                installed ``transformers``' in-memory models (the served ``state_dict``
                names); ``"per_expert"`` for checkpoint files and vLLM/SGLang loaders.
        """
        state = self.full_state_dict()
        if self.lora_config is not None:
            from .lora import merged_state, peft_adapter_state

            state = (merged_state(state, self.lora_config, self.args.tie_embeddings)
                     if merge_lora else peft_adapter_state(state))
            if not merge_lora:
                for name, t in state:
                    if self.rank == 0:
                        yield name, t.detach().cpu()
                return
        layout = serving_expert_layout() if experts is None else experts
        for name, t in archon_to_hf(dict(state), self.args, layout):
            if self.rank == 0:
                t = t.detach().cpu()
                yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    def save_hf(self, path: str, max_shard_bytes: int | None = None) -> None:
        """Write merged weights as a HF checkpoint directory (collective; rank 0 writes);
        MoE experts one tensor per expert, as published checkpoints and vLLM/SGLang expect."""
        from .models import save_hf_checkpoint

        tensors = list(self.export_weights(merge_lora=True, experts="per_expert"))
        if self.rank == 0:
            save_hf_checkpoint(tensors, self.args, path, max_shard_bytes)
        if self.distributed:
            dist.barrier()

    def save_lora_adapter(self, path: str) -> None:
        """Write the adapter in PEFT's format (collective; rank 0 writes).

        Raises:
            ConfigError: the engine has no LoRA.
        """
        if self.lora_config is None:
            raise ConfigError("save_lora_adapter needs an engine built with lora=...")
        from .lora import save_peft_adapter

        tensors = list(self.export_weights(merge_lora=False))
        if self.rank == 0:
            save_peft_adapter(tensors, self.lora_config, path)
        if self.distributed:
            dist.barrier()

    def save(self, path: str) -> None:
        """DCP checkpoint of model, optimizer, scheduler, RNG, step and version (collective)."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, path)

    def load(self, path: str) -> None:
        """Restore a checkpoint written by ``save`` (same parallel layout or resharded by DCP)."""
        from .checkpoint import load_checkpoint

        load_checkpoint(self, path)

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Names (Archon) -> parameters that the optimizer updates."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def close(self) -> None:
        """Drop the model and optimizer (idempotent); the process group is left alone."""
        for attr in ("optimizer", "scheduler", "module", "model", "pipeline"):
            self.__dict__.pop(attr, None)
