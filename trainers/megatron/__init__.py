"""The Megatron backend: Qwen2 / Qwen3 / Llama policies trained as megatron-core ``GPTModel``s.

Importing this package never imports megatron-core (an optional extra:
``pip install "areal-agents[megatron]"``); ``MegatronEngine(...)`` does, and raises
``MegatronNotInstalled`` (a ``ConfigError``) naming the install command when it is missing.
The HF ⇄ megatron conversion in ``convert`` is pure PyTorch.
"""

from .availability import MegatronNotInstalled, megatron_version, require_megatron
from .convert import ModelSpec, hf_to_megatron, megatron_to_hf, shard, spec_from_hf_config, unshard
from .engine import MegatronEngine

__all__ = [
    "MegatronEngine",
    "MegatronNotInstalled",
    "ModelSpec",
    "hf_to_megatron",
    "megatron_to_hf",
    "megatron_version",
    "require_megatron",
    "shard",
    "spec_from_hf_config",
    "unshard",
]
