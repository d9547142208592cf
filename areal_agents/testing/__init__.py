"""Fakes that ship with the package, for testing envs, agents, engines and trainers.

Names are imported lazily so a missing optional module never breaks ``import``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenericTestEnv": "areal_agents.testing.envs",
    "GenericMultiAgentEnv": "areal_agents.testing.envs",
    "DynamicAgentsEnv": "areal_agents.testing.envs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'areal_agents.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
