"""HF-named full weights of a (possibly FSDP2-sharded, possibly LoRA) transformers model."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

_PEFT_PREFIX = "base_model.model."


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for mod_name, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def named_full_weights(
    base: nn.Module, *, lora: bool = False, merge_lora: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` on every rank in a fixed order (collective under FSDP).

    Tied parameters are yielded once (under their first name). With ``lora`` and
    ``merge_lora`` the LoRA deltas are merged into the base weights and names carry no PEFT
    infixes; with ``merge_lora=False`` only the adapter tensors are yielded, named as in a PEFT
    ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``).

    Args:
        base: the transformers model (under PEFT: ``peft_model.get_base_model()``).
    """
    if lora and not merge_lora:
        for name, p in base.named_parameters():
            if "lora_" in name:
                yield _PEFT_PREFIX + name.replace(".default.", "."), _full(p.detach())
        return
    lora_modules: dict[str, nn.Module] = {}
    if lora:
        from peft.tuners.lora import LoraLayer

        lora_modules = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        if lora:
            mod_name, _, leaf = name.rpartition(".")
            owner = mod_name.removesuffix(".base_layer")
            if mod_name.endswith(".base_layer") and owner in lora_modules and leaf == "weight":
                yield owner + ".weight", _merged(lora_modules[owner], _full(p.detach()))
                continue
            name = name.replace(".base_layer.", ".")
        yield name, _full(p.detach())
    for name, b in _persistent_buffers(base):
        yield name.replace(".base_layer.", "."), _full(b)


def _merged(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``W + scaling * B @ A`` for every active adapter of a LoRA linear layer."""
    out = weight.float().clone()
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        a = _full(module.lora_A[adapter].weight.detach()).float()  # [r, in]
        b = _full(module.lora_B[adapter].weight.detach()).float()  # [out, r]
        delta = b @ a
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.t()
        out += delta * module.scaling[adapter]
    return out.to(weight.dtype)
