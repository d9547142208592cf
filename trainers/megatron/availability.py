"""Whether megatron-core can be used here; the one clear error when it cannot."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import warnings

from areal_agents.errors import ConfigError

MIN_VERSION = (0, 12)
MAX_VERSION_EXCLUSIVE = (0, 17)
INSTALL_HINT = (
    'pip install "areal-agents[megatron]" (installs megatron-core>=0.12,<0.17, the range that '
    "supports Python 3.11; megatron-core 0.17 and newer need Python >= 3.12; running on Python "
    f"{sys.version_info.major}.{sys.version_info.minor} here)"
)


class MegatronNotInstalled(ConfigError, ImportError):
    """megatron-core is missing or outside the supported version range.

    A ``ConfigError`` (the Trainer reports it as a configuration problem) and an
    ``ImportError`` (code guarding optional imports catches it).
    """


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


_EXPECTED_WARNINGS = (  # megatron-core 0.12-0.16 on the local (no Apex / TransformerEngine) path
    ".*(Apex|Transformer Engine).*",  # the local spec is meant to run without them
    ".*custom_layers.transformer_engine.*",  # megatron's own import of its deprecated module
    ".*[Ee]ncoder.specific pipeline parallelism.*",  # 0.13 announces a removal at import
    ".*scope is deprecated.*",  # a TransformerConfig default megatron deprecates itself
    ".*MLP requires ffn_hidden_size.*",  # megatron's GPT spec builds MLP without it
    ".*tp_group is None.*",  # megatron's RowParallelLinear passes tp_group=None each forward
    ".*CUDA_DEVICE_MAX_CONNECTIONS.*",  # a GPU tuning hint printed on every TP>1 forward
)


def mute_megatron_warnings() -> None:
    """Ignore the warnings above when megatron-core itself emits them (process-wide filters
    restricted to ``megatron.*`` modules; other code's warnings are untouched). Idempotent."""
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, module=r"megatron\.")


def megatron_version() -> str | None:
    """The installed megatron-core version, or ``None``."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_megatron() -> None:
    """Import ``megatron.core`` or raise ``MegatronNotInstalled`` naming the fix.

    megatron-core warns that Transformer Engine and Apex are missing and prints deprecation
    notes about its own code; on this path they are expected and muted
    (``mute_megatron_warnings``).

    Raises:
        MegatronNotInstalled: not importable, or a version outside ``[0.12, 0.17)``.
    """
    mute_megatron_warnings()
    try:
        importlib.import_module("megatron.core")
    except ImportError as exc:
        raise MegatronNotInstalled(
            f"backend='megatron' needs megatron-core, which is not importable ({exc}). "
            f"Install it with: {INSTALL_HINT}; or use backend='fsdp' or 'archon'."
        ) from exc
    version = megatron_version()
    if version is not None and not MIN_VERSION <= _version_tuple(version) < MAX_VERSION_EXCLUSIVE:
        raise MegatronNotInstalled(
            f"megatron-core {version} is installed; the megatron backend supports >=0.12,<0.17. "
            f"Install a supported version with: {INSTALL_HINT}"
        )
    try:
        importlib.import_module("areal_agents.trainers.megatron.model")
    except ImportError as exc:  # importable, but not the API this backend was written for
        raise MegatronNotInstalled(
            f"megatron-core {version} is installed but lacks an API the megatron backend uses "
            f"({exc}). Install a supported version with: {INSTALL_HINT}"
        ) from exc
