"""``FSDPEngine``: a transformers causal LM trained with FSDP2 (or plain PyTorch in one process)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from areal_agents.errors import ConfigError
from areal_agents.samples import TokenBatch
from areal_agents.trainers.base import LossFn, TrainEngine
from areal_agents.trainers.lm_head import head_operands
from areal_agents.trainers.logprobs import DEFAULT_CHUNK_SIZE, RowSampling, sequence_logprobs
from areal_agents.trainers.microbatch import plan_microbatches
from areal_agents.trainers.schedules import LRSchedule, check_lr_schedule, lr_lambda
from areal_agents.trainers.shared_prefix import (
    PrefixPlan,
    RowPrompts,
    shared_prefix_hidden,
    supports_shared_prefix,
)
from areal_agents.trainers.step import (
    accumulate_microbatches,
    add_shared_prompt_stat,
    batch_prompts,
    loss_positions,
    plan_rank_microbatches,
    prompt_plan,
    run_train_step,
)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor (a collective for a ``DTensor``: call on every rank)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDPPolicyModule(nn.Module):
    """Wraps a causal LM so one forward returns chunked ``(logprobs, entropy)`` ``[B, T]``
    under each sequence's sampling distribution (``sampling``: a ``RowSampling`` of ``[B]``
    rows, or one temperature; see ``trainers/logprobs.py``).

    Everything (backbone, final norm, LM head) runs inside this module's forward, so under
    FSDP2 the root's parameters are unsharded while the chunked LM-head projection uses them.
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    @property
    def base(self) -> nn.Module:
        """The transformers model (under PEFT, the model carrying the LoRA layers)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        sampling: RowSampling | float = 1.0, positions: torch.Tensor | None = None,
        prefix_plan: PrefixPlan | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base
        backbone = getattr(base, base.base_model_prefix)
        if prefix_plan is not None:  # each shared prompt once (trainers/shared_prefix.py)
            hidden = shared_prefix_hidden(backbone, prefix_plan, input_ids.shape[1])
        else:
            hidden = backbone(input_ids=input_ids,
                              attention_mask=attention_mask.long()).last_hidden_state
        hidden, weight = head_operands(base.get_output_embeddings(), hidden)  # LoRA on it too
        return sequence_logprobs(
            hidden, weight, input_ids, attention_mask, sampling, self.chunk_size, positions
        )


def _load_model(model_or_path: nn.Module | str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer or None)`` from a model, an HF checkpoint dir or a "tiny:..." spec."""
    if isinstance(model_or_path, nn.Module):
        return model_or_path, None
    from areal_agents.models import load

    model, tokenizer = load(model_or_path, dtype=torch.float32)
    return model, tokenizer


def _apply_lora(model: nn.Module, lora: Any) -> nn.Module:
    from areal_agents.extras import require

    require("peft", "lora", "LoRA on the FSDP backend (Policy.lora)")
    from peft import LoraConfig, get_peft_model

    cfg = lora if isinstance(lora, LoraConfig) else LoraConfig(task_type="CAUSAL_LM", **dict(lora))
    with warnings.catch_warnings():  # peft calls transformers' deprecated checkpointing query
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, cfg)
    return peft_model


class FSDPEngine(TrainEngine):
    """One trainable policy: a transformers causal LM, FSDP2-sharded when distributed.

    With ``torch.distributed`` initialised over more than one rank, ``fully_shard`` wraps every
    decoder layer and the root; every rank must call ``train_step``/``forward_logprobs``/
    ``export_weights``/``save``/``load`` collectively with the *same full batch* (each rank
    trains on its share of the sequences; gradients add up to the single-process gradient).
    Otherwise (no process group, or one of world size 1) it is a plain single-process model
    (``distributed`` is False); its checkpoints load either way (DCP, same parameter names).

    Args:
        model_or_path: a ``transformers`` causal LM, an HF checkpoint directory or a tiny-model
            spec such as ``"tiny:s"`` (``areal_agents.models.load``; sets ``self.tokenizer``).
        lr, weight_decay, betas: AdamW hyper-parameters.
        max_grad_norm: global grad-norm clip (``0`` disables clipping, the norm is still reported).
        warmup_steps: linear warm-up steps; then ``lr_schedule`` ("constant" or "cosine" to 0
            at ``total_steps``).
        token_budget: maximum padded tokens per micro-batch.
        gradient_checkpointing: recompute decoder layers in the backward pass.
        lora: ``None``, a dict of ``peft.LoraConfig`` arguments, or a ``LoraConfig``.
        mixed_precision: ``"bf16"`` (CUDA only) or ``"fp32"``; ``None`` picks bf16 on CUDA.
        share_prompts: rows that start with the same prompt (a GRPO group) run it once per
            forward (``trainers/shared_prefix.py``; same values to float rounding), and
            micro-batches keep a group's rows together (``plan_microbatches``); in one process
            and under FSDP2, without gradient checkpointing, on full-attention models, and
            only where it saves >= 20% of a micro-batch's tokens. ``shared_prompt_tokens``
            counts this process's saved tokens; a train step's stat sums the ranks' (absent
            when nothing was shared).
        device: defaults to ``cuda:LOCAL_RANK`` when available, else CPU.
        chunk_size: rows per chunk of the LM-head log-prob computation.

    Raises:
        ConfigError: unknown schedule, cosine without ``total_steps``, bf16 on CPU.

    Example:
        >>> engine = FSDPEngine(model, lr=1e-5)  # doctest: +SKIP
        >>> stats = engine.train_step(batch, algo.loss)  # doctest: +SKIP
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
        gradient_checkpointing: bool = False,
        lora: Any = None,
        mixed_precision: Literal["bf16", "fp32"] | None = None,
        device: torch.device | str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        share_prompts: bool = True,
    ) -> None:
        check_lr_schedule(lr_schedule, total_steps)
        # one rank of a process group (a 1-process worker group) trains the plain module, as
        # in one process: FSDP2 at world size 1 only adds DTensor and unshard overhead
        self.distributed = (dist.is_available() and dist.is_initialized()
                            and dist.get_world_size() > 1)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if mixed_precision is None:
            mixed_precision = "bf16" if self.device.type == "cuda" else "fp32"
        if mixed_precision == "bf16" and self.device.type != "cuda":
            raise ConfigError("mixed_precision='bf16' needs a CUDA device; use 'fp32' on CPU")
        self.mixed_precision = mixed_precision
        self.max_grad_norm = max_grad_norm
        self.token_budget = token_budget
        self.step = 0
        self.version = 0
        self._export_views: list[tuple[str, torch.Tensor]] | None = None

        model, self.tokenizer = _load_model(model_or_path)
        model = model.to(self.device)
        if gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            model = _apply_lora(model, lora)
        self.model = model
        self.lora = lora is not None
        self.module = FSDPPolicyModule(model, chunk_size)
        # FSDP2 runs each sharded layer twice per forward (prompt pass, remainder pass): it
        # unshards it per call and re-gathers it in backward once per call (docs/backends.md)
        self.share_prompts = (share_prompts and not gradient_checkpointing
                              and supports_shared_prefix(self.module.base))
        self.shared_prompt_tokens = 0  # tokens the shared-prompt plans saved, over the run
        if self.distributed:
            self._shard()
        params = [p for p in self.module.parameters() if p.requires_grad]
        # fused AdamW: one kernel over all tensors (CPU and CUDA; ~3x the default per-tensor
        # loop on CPU); results equal the per-tensor loop to float rounding
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                           fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup_steps, lr_schedule, total_steps)
        )

    def _shard(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy()
        if self.mixed_precision == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        base = self.module.base
        layers = getattr(getattr(base, base.base_model_prefix), "layers", None)
        if layers is None:
            raise ConfigError(f"{type(base).__name__} has no decoder `layers` to shard per layer")
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(self.module, mp_policy=mp)

    # -- TrainEngine -------------------------------------------------------------------------

    def _forward(self, mb: TokenBatch,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sampling = RowSampling.of(mb)  # per-row temperature/top-k/top-p (not cast by FSDP)
        plan = prompt_plan(mb) if self.share_prompts else None
        self.shared_prompt_tokens += plan.saved_tokens if plan is not None else 0
        if self.mixed_precision == "bf16" and not self.distributed:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.module(mb.input_ids, mb.attention_mask, sampling, positions, plan)
        return self.module(mb.input_ids, mb.attention_mask, sampling, positions, plan)

    def _prompts(self, batch: TokenBatch) -> RowPrompts | None:
        """Every row's prompt key when sharing prompts (micro-batches then keep a group's
        rows together, ``trainers/microbatch.py``), else ``None`` (plan by length)."""
        return batch_prompts(batch) if self.share_prompts else None

    def _train_forward(self, mb: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``_forward`` at the loss's positions only (``LossFn``: 0 elsewhere)."""
        return self._forward(mb, loss_positions(mb))

    @torch.no_grad()
    def forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[B, T]`` float32 log-probs of ``batch.input_ids`` (CPU) under each row's sampling
        params (``batch.temperature``/``top_k``/``top_p``; see ``TrainEngine``).

        Under FSDP every rank computes the whole batch (collective) and returns the same tensor.
        """
        self.module.eval()
        batch = batch.to(self.device)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        lengths = batch.attention_mask.sum(-1).tolist()
        for idx in plan_microbatches(lengths, self.token_budget, self._prompts(batch)):
            mb = batch.select(torch.tensor(idx))
            lp, _ = self._forward(mb)
            out[idx, : lp.shape[1]] = lp.float().cpu()
        return out

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on ``batch`` (see ``TrainEngine``; the loop is
        ``trainers/step.py``); returns global stats.

        Raises:
            TrainError: the loss is not finite.
        """
        self.module.train()
        batch = batch.to(self.device)
        group = dist.group.WORLD if self.distributed else None
        slots = plan_rank_microbatches(batch.attention_mask.sum(-1).tolist(), self.rank,
                                       self.world_size, self.token_budget, group=group,
                                       device=self.device, prompts=self._prompts(batch))
        shared_before = self.shared_prompt_tokens
        out = run_train_step(
            # FSDP averages gradients over ranks: scale each rank's share back to a sum
            lambda: accumulate_microbatches(batch, slots, self._train_forward, loss_fn,
                                            grad_scale=self.world_size, group=group,
                                            device=self.device),
            optimizer=self.optimizer, scheduler=self.scheduler,
            clip_grad_norm=self.clip_grad_norm, num_tokens=batch.num_tokens, step=self.step)
        self.step += 1
        if self.share_prompts:  # summed over the ranks, like the other stats
            add_shared_prompt_stat(out, self.shared_prompt_tokens - shared_before, group,
                                   self.device)
        return out

    def clip_grad_norm(self) -> float:
        """Clip the gradients to ``max_grad_norm`` (global L2 norm; ``0`` only reports it);
        returns the norm before clipping (collective under FSDP)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        clip = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)))

    def export_weights(
        self, merge_lora: bool = True, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, full CPU tensor)``; collective under FSDP, rank 0 yields.

        Unsharded CPU tensors may alias the live parameters (no copy): consume or copy them
        before the next ``train_step``.

        Args:
            merge_lora: with LoRA, yield base weights with ``W + scaling * B @ A`` merged in
                (HF names); ``False`` yields the adapter alone (PEFT adapter-file names).
            dtype: cast floating tensors to this dtype (default: as trained).
        """
        from areal_agents.trainers.fsdp.export import named_full_weights

        if not self.distributed and not self.lora:
            # plain parameters: the (name, detached view) list never changes, walk modules once
            if self._export_views is None:
                self._export_views = list(named_full_weights(self.module.base))
            named: Iterable[tuple[str, torch.Tensor]] = self._export_views
        else:
            named = named_full_weights(self.module.base, lora=self.lora, merge_lora=merge_lora)
        for name, t in named:
            if self.rank == 0:
                t = t.detach().cpu()
                yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    def save(self, path: str) -> None:
        from areal_agents.trainers.fsdp.checkpoint import save_checkpoint

        save_checkpoint(self, path)

    def load(self, path: str) -> None:
        from areal_agents.trainers.fsdp.checkpoint import load_checkpoint

        load_checkpoint(self, path)

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Names -> parameters that the optimizer updates."""
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def close(self) -> None:
        """Drop the model and optimizer (idempotent); the process group is left alone."""
        for attr in ("optimizer", "scheduler", "module", "model"):
            self.__dict__.pop(attr, None)
