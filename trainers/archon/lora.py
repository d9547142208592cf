"""Native LoRA for Archon models: low-rank adapters added to existing ``nn.Linear`` layers.

A targeted linear keeps its name and weight and gains two parameters, ``lora_A [r, in]`` and
``lora_B [out, r]``; its output becomes ``W x + b + (alpha / r) * B A dropout(x)``. Everything
else is frozen. Because adapters are plain parameters of the same module, FSDP2 shards them with
their layer and TP distributes them with the layer's plan (DTensor keeps the maths exact).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from areal_agents.errors import ConfigError

# HF projection names accepted as aliases of the Archon ones
_HF_ALIASES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
               "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "output"}
_A2HF_MODULE = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters.

    Attributes:
        rank: adapter rank ``r``.
        alpha: scaling numerator (``scaling = alpha / rank``).
        dropout: dropout on the adapter input.
        target_modules: ``fnmatch`` patterns matched against the module's full Archon name
            (``layers.0.attention.wq``) or its last part; HF names (``q_proj``) are accepted.
        seed: seed of the ``lora_A`` initialisation (identical on every rank).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    seed: int = 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def matches(self, name: str) -> bool:
        last = name.rsplit(".", 1)[-1]
        for pattern in self.target_modules:
            pattern = _HF_ALIASES.get(pattern, pattern)
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(last, pattern):
                return True
        return False


_PEFT_KEYS = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}
_PEFT_IGNORED = {"task_type", "bias", "inference_mode", "fan_in_fan_out", "peft_type"}


def lora_config(config: Any) -> LoRAConfig:
    """A ``LoRAConfig`` from itself, a dict of its fields, PEFT-style keys (``r``,
    ``lora_alpha``, ``lora_dropout``, ``target_modules``) or a ``peft.LoraConfig``.

    Raises:
        ConfigError: an unknown key.
    """
    if isinstance(config, LoRAConfig):
        return config
    if not isinstance(config, dict):  # peft.LoraConfig
        config = {k: getattr(config, k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    kw: dict[str, Any] = {}
    for key, value in config.items():
        if key in _PEFT_IGNORED:
            continue
        name = _PEFT_KEYS.get(key, key)
        if name not in LoRAConfig.__dataclass_fields__:
            raise ConfigError(f"unknown LoRA option {key!r}; use rank/alpha/dropout/target_modules/seed "
                              "(or PEFT's r/lora_alpha/lora_dropout)")
        kw[name] = sorted(value) if name == "target_modules" and isinstance(value, set) else value
    return LoRAConfig(**kw)


class LoRALinear(nn.Linear):
    """``nn.Linear`` with a low-rank adapter (created by ``apply_lora``, not directly)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scaling: float
    lora_dropout: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.lora_scaling


def apply_lora(model: nn.Module, config: LoRAConfig | dict[str, Any]) -> LoRAConfig:
    """Add adapters to every ``nn.Linear`` whose name matches, freeze all other parameters.

    Returns:
        The ``LoRAConfig`` used.

    Raises:
        ConfigError: bad rank, or no module matches ``target_modules``.
    """
    cfg = config if isinstance(config, LoRAConfig) else lora_config(config)
    if cfg.rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1 (got {cfg.rank})")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and cfg.matches(n)]
    if not targets:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"LoRA target_modules {cfg.target_modules} match no linear layer; available: {names}")
    for _, module in targets:
        w = module.weight
        a = torch.empty(cfg.rank, module.in_features)
        bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform(a=sqrt(5)), as nn.Linear/PEFT
        a.uniform_(-bound, bound, generator=gen)
        module.__class__ = LoRALinear
        module.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        module.lora_B = nn.Parameter(torch.zeros(module.out_features, cfg.rank, device=w.device, dtype=w.dtype))
        module.lora_scaling = cfg.scaling
        module.lora_dropout = cfg.dropout
    return cfg


def freeze_non_adapters(model: nn.Module) -> None:
    """Re-freeze everything except adapters (parallel styles may re-create parameters, e.g.
    TP's ``SequenceParallel`` turns norm weights into new, trainable DTensor parameters)."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)


def merged_state(state: Iterable[tuple[str, torch.Tensor]], cfg: LoRAConfig,
                 tied_head: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Full Archon state with ``W + scaling * B @ A`` merged and the adapter entries dropped.

    Raises:
        ValueError: an adapter on ``output`` while ``tied_head`` (the head is the input
            embedding, exported once as ``embed_tokens``: one matrix cannot hold the adapted
            head and the unadapted embedding).
    """
    items = dict(state)
    if tied_head and "output.lora_A" in items:
        raise ValueError("cannot merge the LoRA adapter of the LM head (output) into a head tied "
                         "to the input embedding: untie the model first (tie_word_embeddings="
                         "False, lora_policies.untie_embeddings) or export merge_lora=False")
    for name, t in items.items():
        if ".lora_" in name:
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is not None and f"{prefix}.lora_A" in items:
            a, b = items[f"{prefix}.lora_A"], items[f"{prefix}.lora_B"]
            t = t + cfg.scaling * (b.float() @ a.float()).to(t.dtype)
        yield name, t


def peft_adapter_state(state: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Only the adapters, named as in PEFT's ``adapter_model.safetensors`` (the head's
    ``output`` is HF's top-level ``lm_head``)."""
    for name, t in state:
        if ".lora_" not in name:
            continue
        module, kind = name.rsplit(".", 1)  # layers.0.attention.wq, lora_A
        if module == "output":
            yield f"base_model.model.lm_head.{kind}.weight", t
            continue
        layer, rest = module.split(".", 2)[1], module.split(".", 2)[2]
        if rest not in _A2HF_MODULE:
            raise KeyError(f"no PEFT name for adapter {name!r}")
        yield f"base_model.model.model.layers.{layer}.{_A2HF_MODULE[rest]}.{kind}.weight", t


def peft_adapter_config(cfg: LoRAConfig, adapter_names: Iterable[str], base_model_name: str = "") -> dict[str, Any]:
    """``adapter_config.json`` contents for PEFT; ``target_modules`` lists the exact HF module
    names carrying adapters (PEFT matches them as suffixes), so per-layer patterns survive."""
    mods = sorted({n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in adapter_names})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": mods, "bias": "none",
            "base_model_name_or_path": base_model_name, "fan_in_fan_out": False,
            "inference_mode": True}


def save_peft_adapter(tensors: Iterable[tuple[str, torch.Tensor]], cfg: LoRAConfig, path: str) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` that PEFT loads."""
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(peft_adapter_config(cfg, tensors), f, indent=2)
