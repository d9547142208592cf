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
    ``merge_lora`` the LoRA deltas (of linear layers and of embeddings such as
    ``embed_tokens``) are merged into the base weights and names carry no PEFT infixes; with
    ``merge_lora=False`` only the adapter tensors are yielded, named as in a PEFT
    ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``).

    Args:
        base: the transformers model (under PEFT: ``peft_model.get_base_model()``).

    Raises:
        ValueError: merging an adapted weight that is tied to another parameter (an
            ``embed_tokens`` adapter over a tied output head): one tied matrix cannot hold the
            adapted embedding and the unadapted head. Untie the model first
            (``lora_policies.untie_embeddings``) or export ``merge_lora=False``.
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
        names_of: dict[int, list[str]] = {}
        for name, p in base.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(p), []).append(name)
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        if lora:
            mod_name, _, leaf = name.rpartition(".")
            owner = mod_name.removesuffix(".base_layer")
            if mod_name.endswith(".base_layer") and owner in lora_modules and leaf == "weight":
                if len(names_of[id(p)]) > 1:
                    raise ValueError(
                        f"cannot merge the LoRA adapter of {owner} into a weight tied to "
                        f"{[n for n in names_of[id(p)] if n != name]}: untie the model first "
                        "(lora_policies.untie_embeddings) or export merge_lora=False")
                yield owner + ".weight", _merged(lora_modules[owner], _full(p.detach()))
                continue
            name = name.replace(".base_layer.", ".")
        yield name, _full(p.detach())
    for name, b in _persistent_buffers(base):
        yield name.replace(".base_layer.", "."), _full(b)


def _merged(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``W + scaling * B @ A`` for every active adapter of a LoRA linear layer, and
    ``W + scaling * (B @ A)^T`` for a LoRA embedding (PEFT's ``lora_embedding_A`` is
    ``[r, num_embeddings]``, ``lora_embedding_B`` ``[embedding_dim, r]``)."""
    out = weight.float().clone()
    embedding_a = getattr(module, "lora_embedding_A", {})
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            a = _full(module.lora_A[adapter].weight.detach()).float()  # [r, in]
            b = _full(module.lora_B[adapter].weight.detach()).float()  # [out, r]
            delta = b @ a
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.t()
        elif adapter in embedding_a:
            a = _full(embedding_a[adapter].detach()).float()  # [r, num_embeddings]
            b = _full(module.lora_embedding_B[adapter].detach()).float()  # [dim, r]
            delta = (b @ a).t()
        else:
            continue
        out += delta * module.scaling[adapter]
    return out.to(weight.dtype)
