"""The LM head as the chunked log-prob path takes it: ``(hidden, weight)`` whose product is the
head's logits, LoRA adapters on the head included (``head_operands``).

``trainers/logprobs.py`` never calls the head module: it multiplies hidden states by a
``[vocab, h]`` weight chunk by chunk. A LoRA adapter on the head adds ``s * B (A h)``; written
as one product over stacked operands::

    logits = W h + s * B (A h) = [W | B] @ [h ; s * A h]      # [vocab, h + r] @ [h + r]

so the chunked path gets ``cat(hidden, s * A h)`` and ``cat(W, B)`` and autograd reaches
``A`` (through ``s * A h``) and ``B`` (through the weight's gradient), exactly, with no
``[vocab, h]`` delta built. ``B``'s gradient is a column slice of the stacked weight's
(strided): autograd's accumulation copies it into ``B``'s layout, and after the zero-bubble
pipeline schedules' weight pass, which assigns it as it is, ``archon.optim.contiguous_grads``
does (the fused AdamW step reads gradients as contiguous). Each active adapter adds its own
``r`` columns. Used by every backend's log-prob path (``fsdp/engine.py``,
``archon/policy.py``, ``archon/pipeline.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from areal_agents.errors import ConfigError

__all__ = ["head_operands"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated head's tensor as its local copy (the log-prob path is per rank); other
    tensors as they are."""
    if isinstance(t, DTensor) and all(p.is_replicate() for p in t.placements):
        return t.to_local()
    return t


def _peft_adapters(head: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float, nn.Module]]:
    """``(A [r, h], B [vocab, r], scaling, dropout)`` of each active adapter of a PEFT LoRA
    head (none while merged or disabled: the base layer then is the whole head)."""
    if head.disable_adapters or head.merged:
        return []
    out = []
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}) or head.use_dora.get(name, False):
            raise ConfigError(f"LoRA adapter {name!r} on the LM head is a variant (e.g. DoRA); "
                              "the log-prob path supports plain LoRA on lm_head: set "
                              "use_dora=False or drop lm_head from target_modules")
        if head.lora_B[name].bias is not None:
            raise ConfigError(f"LoRA adapter {name!r} on the LM head has a bias (lora_bias); "
                              "the log-prob path takes a head without bias: drop lora_bias")
        out.append((head.lora_A[name].weight, head.lora_B[name].weight,
                    float(head.scaling[name]), head.lora_dropout[name]))
    return out


def _adapters(head: nn.Module) -> tuple[nn.Module, list]:
    """``(the linear holding the base weight, [(A, B, scaling, dropout fn), ...])``."""
    if hasattr(head, "base_layer") and hasattr(head, "lora_A"):  # PEFT's lora.Linear
        if getattr(head, "fan_in_fan_out", False):
            raise ConfigError("a LoRA LM head with fan_in_fan_out=True ([in, out] weights) is "
                              "not supported by the log-prob path; use a Linear head")
        return head.base_layer, _peft_adapters(head)
    if isinstance(getattr(head, "lora_A", None), torch.Tensor):  # Archon's LoRALinear
        p = float(head.lora_dropout)
        return head, [(head.lora_A, head.lora_B, float(head.lora_scaling),
                       lambda x: F.dropout(x, p, head.training) if p else x)]
    return head, []


def head_operands(head: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [..., h + R], weight [vocab, h + R])`` with ``x @ weight.T == head(hidden)``.

    A plain head gives ``(hidden, head.weight)``; a LoRA head (PEFT's ``lora.Linear`` or
    Archon's ``LoRALinear``) appends ``s * A dropout(h)`` to the hidden states and its ``B``
    to the weight for each active adapter (``R`` = the sum of their ranks), so the log-prob
    path's gradients reach ``A`` and ``B``. Dropout on the adapter input is applied as the
    module's forward would (in training mode only). A replicated ``DTensor`` head gives its
    local tensors (TP's plan replicates the head; ``archon/policy.py``).

    Args:
        head: the model's output projection (``get_output_embeddings()`` / ``output``).
        hidden: ``[..., h]`` final (normed) hidden states.

    Raises:
        ConfigError: a head with a bias (base or adapter), a LoRA variant such as DoRA, or
            ``fan_in_fan_out`` weights: the chunked path multiplies by one bias-free matrix.
    """
    base, adapters = _adapters(head)
    if getattr(base, "bias", None) is not None:
        raise ConfigError("LM heads with a bias are not supported by the chunked log-prob path")
    weight = _local(base.weight)
    if not adapters:
        return hidden, weight
    xs, ws = [hidden], [weight]
    for a, b, scaling, dropout in adapters:
        a, b = _local(a), _local(b)
        xs.append(dropout(hidden).to(a.dtype) @ a.t() * scaling)  # [..., r]
        ws.append(b.to(weight.dtype))
    return torch.cat([x.to(hidden.dtype) for x in xs], -1), torch.cat(ws, 1)
