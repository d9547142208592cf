"""FP8 training for Archon linear layers via ``torchao.float8`` (CUDA, compute capability >= 8.9).

Import-safe on CPU: nothing from torchao is imported until ``apply_fp8`` runs.
"""

from __future__ import annotations

import torch
from torch import nn

from areal_agents.errors import ConfigError


def fp8_supported() -> bool:
    """True when a CUDA device with FP8 tensor cores (SM 8.9+) and ``torchao`` are available."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return False
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return True


def _eligible(module: nn.Module, fqn: str) -> bool:
    """FP8 GEMMs need both dimensions divisible by 16; the LM head stays in high precision."""
    return (isinstance(module, nn.Linear) and fqn != "output"
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_fp8(model: nn.Module, recipe: str = "tensorwise") -> None:
    """Swap eligible ``nn.Linear`` layers for torchao ``Float8Linear`` (dynamic scaling).

    Args:
        recipe: a torchao recipe name (``"tensorwise"``, ``"rowwise"``, ...).

    Raises:
        ConfigError: no CUDA device with FP8 support, or torchao is not installed.
    """
    if not torch.cuda.is_available():
        raise ConfigError("fp8=True needs a CUDA device (SM 8.9+, e.g. H100/L40/RTX 4090); use fp8=False on CPU")
    if torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError(f"fp8=True needs compute capability >= 8.9 (got {torch.cuda.get_device_capability()})")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ConfigError("fp8=True needs torchao: pip install torchao") from e
    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(model, config=config, module_filter_fn=_eligible)
