"""Parallelism for Archon models, applied from outside the model code.

Order (as in torchtitan): tensor parallel -> FP8 -> activation checkpointing -> compile ->
FSDP2. Every function mutates the model in place and keeps parameter names unchanged, so
state dicts, HF conversion and DCP checkpoints see the same names at every parallel layout.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from areal_agents.errors import ConfigError

ACMode = Literal["none", "full", "selective"]


def tp_plan(sequence_parallel: bool = False, qk_norm: bool = False) -> dict:
    """The per-block ``parallelize_module`` plan: q/k/v and w1/w3 column-wise, wo and w2
    row-wise. With ``sequence_parallel`` the norms run on sequence shards (``Shard(1)``).
    Qwen3's q/k norms see only the local heads, so their weights become replicated DTensors
    with the input sharded on the head dim (their gradients are then summed over TP ranks)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    plan: dict = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate()),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate()),
    }
    if qk_norm:
        plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    if sequence_parallel:
        to_full = PrepareModuleInput(
            input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
        )
        plan.update({
            "attention_norm": SequenceParallel(),
            "ffn_norm": SequenceParallel(),
            "attention": to_full,
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
        })
    return plan


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> None:
    """Shard attention heads and MLP columns of every block over ``tp_mesh``.

    Embeddings, final norm and LM head stay replicated (their gradients are identical on
    every TP rank because column-parallel inputs all-reduce their gradients).

    Raises:
        ConfigError: head counts are not divisible by the TP degree, or MoE blocks are used.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        PrepareModuleInput,
        PrepareModuleOutput,
        parallelize_module,
    )

    args, tp = model.args, tp_mesh.size()
    if args.n_heads % tp or args.n_kv_heads % tp:
        raise ConfigError(
            f"tp={tp} must divide n_heads={args.n_heads} and n_kv_heads={args.n_kv_heads}"
        )
    if args.is_moe:
        raise ConfigError("tensor parallel is not implemented for MoE blocks; use ep/dp_shard")
    for block in model.layers.values():
        if sequence_parallel:
            # the residual stream is sequence-sharded inside the block, replicated between blocks
            parallelize_module(block, tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(), None, None),
                desired_input_layouts=(Shard(1), None, None),
                use_local_output=True,
            ))
            parallelize_module(block, tp_mesh, PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate()))
        parallelize_module(block, tp_mesh, tp_plan(sequence_parallel, args.qk_norm))


def _selective_policy():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return partial(create_selective_checkpoint_contexts, policy)


def apply_ac(model: nn.Module, mode: ACMode = "full") -> None:
    """Activation checkpointing per block: ``full`` recomputes the whole block in backward,
    ``selective`` keeps matmul/attention outputs and recomputes the cheap element-wise ops.

    Raises:
        ConfigError: unknown ``mode``.
    """
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ConfigError(f"activation_checkpoint must be 'none', 'full' or 'selective' (got {mode!r})")
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_policy()
    for block in model.layers.values():
        inner = block.forward

        def forward(*args, _inner=inner, **kw):
            return checkpoint(_inner, *args, **kwargs, **kw)

        block.forward = forward  # instance attribute: names and hooks are unchanged


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` each block separately (repeated blocks share one compiled graph)."""
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=False)


def apply_fsdp(model: nn.Module, root: nn.Module, dp_mesh, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool | None = None, ignored_params: set | None = None) -> None:
    """FSDP2 ``fully_shard`` on every block, then on ``root`` (embeddings, norm, head).

    Gradients are averaged over ``dp_mesh`` (scale micro-batch losses by its size).
    ``ignored_params`` (expert-parallel experts) stay as they are.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # None: reshard every block but the last, whose backward starts right after forward
        reshard = (i < len(blocks) - 1) if reshard_after_forward is None else reshard_after_forward
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard,
                    ignored_params=ignored_params)
    fully_shard(root, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward is not False,
                ignored_params=ignored_params)


def parallelize(
    model: nn.Module,
    root: nn.Module,
    dims,
    *,
    sequence_parallel: bool = False,
    activation_checkpoint: ACMode = "none",
    compile: bool | str = False,
    param_dtype: torch.dtype | None = None,
    ignored_params: set | None = None,
    reshard_after_forward: bool | None = None,
) -> None:
    """Apply TP, AC, compile and FSDP2 to ``model`` (wrapped by ``root``) as ``dims`` says.

    Args:
        model: an Archon ``Transformer`` (or one pipeline stage of it).
        root: the module whose forward runs ``model`` (FSDP root; may be ``model``).
        dims: a ``ParallelDims`` (its mesh must already be buildable).
        compile: ``True`` for inductor or a backend name.
        reshard_after_forward: FSDP2 frees the unsharded block weights after forward and
            all-gathers them again for backward; ``False`` keeps them (one all-gather per
            block per step instead of two, at the memory of the unsharded weights); ``None``
            reshards all blocks but the last (its backward starts right after forward).
    """
    mesh = dims.build_mesh(next(model.parameters()).device.type) if dims.world_size > 1 else None
    if dims.tp_enabled:
        apply_tp(model, mesh["tp"], sequence_parallel)
    apply_ac(model, activation_checkpoint)
    if compile:
        apply_compile(model, "inductor" if compile is True else compile)
    if dims.dp_enabled:
        apply_fsdp(model, root, mesh["dp_shard"], param_dtype, ignored_params=ignored_params,
                   reshard_after_forward=reshard_after_forward)
