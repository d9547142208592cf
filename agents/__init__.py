"""Built-in agents: random, scripted, human and LLM agents.

``LLMAgent`` (``areal_agents.agents.llm``) is imported lazily, on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from areal_agents.agents.human import HumanAgent
from areal_agents.agents.random_agent import RandomAgent
from areal_agents.agents.scripted import ScriptedAgent

_LAZY = {"LLMAgent": "areal_agents.agents.llm"}

__all__ = ["HumanAgent", "LLMAgent", "RandomAgent", "ScriptedAgent"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'areal_agents.agents' has no attribute {name!r}")
