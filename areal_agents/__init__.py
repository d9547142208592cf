"""areal_agents: async multi-agent, multi-LLM reinforcement learning for LLM agents.

The flat public API (``import areal_agents as aa``). Names are imported lazily, so
``import areal_agents`` stays cheap and never imports torch-heavy backends until used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # environments
    "AgentEnv": "areal_agents.env",
    "MultiAgentEnv": "areal_agents.env",
    "EnvSpec": "areal_agents.registration",
    "register": "areal_agents.registration",
    "make": "areal_agents.registration",
    "spec": "areal_agents.registration",
    "registry": "areal_agents.registration",
    "check_env": "areal_agents.checker",
    "CheckReport": "areal_agents.checker",
    "to_gymnasium": "areal_agents.adapters",
    "to_pettingzoo": "areal_agents.adapters",
    "TimeLimit": "areal_agents.wrappers",
    "RecordEpisode": "areal_agents.wrappers",
    "TransformObservation": "areal_agents.wrappers",
    "FixedOpponents": "areal_agents.wrappers",
    # messages
    "Message": "areal_agents.messages",
    "ToolCall": "areal_agents.messages",
    "message": "areal_agents.messages",
    "user": "areal_agents.messages",
    "system": "areal_agents.messages",
    "tool_call": "areal_agents.messages",
    "tool_result": "areal_agents.messages",
    "parse_action": "areal_agents.messages",
    # agents and episodes
    "Agent": "areal_agents.agent",
    "RandomAgent": "areal_agents.agents",
    "ScriptedAgent": "areal_agents.agents",
    "HumanAgent": "areal_agents.agents",
    "LLMAgent": "areal_agents.agents",
    "Gateway": "areal_agents.gateway",
    "Episode": "areal_agents.episode",
    "run_episode": "areal_agents.episode",
    # token-level data
    "Sample": "areal_agents.samples",
    "TokenBatch": "areal_agents.samples",
    "collate": "areal_agents.samples",
    # engines
    "LocalEngine": "areal_agents.engines.local",
    # errors
    "AgentsError": "areal_agents.errors",
    "EnvError": "areal_agents.errors",
    "ResetNeeded": "areal_agents.errors",
    "UnknownAgent": "areal_agents.errors",
    "MissingAction": "areal_agents.errors",
    "RegistryError": "areal_agents.errors",
    "EngineError": "areal_agents.errors",
    "EngineTimeout": "areal_agents.errors",
    "ContextLengthExceeded": "areal_agents.errors",
    "TrainError": "areal_agents.errors",
    # training backends
    "ArchonEngine": "areal_agents.trainers.archon",
    "FSDPEngine": "areal_agents.trainers.fsdp",
    "MegatronEngine": "areal_agents.trainers.megatron",  # needs the [megatron] extra to construct
    "SFTTrainer": "areal_agents.trainers.sft",
    "ConfigError": "areal_agents.errors",
    # training
    "Trainer": "areal_agents.trainers.trainer",
    "Policy": "areal_agents.trainers.policy",
    "OpponentPool": "areal_agents.league",
    # algorithms
    "GRPO": "areal_agents.algorithms",
    "DrGRPO": "areal_agents.algorithms",
    "RLOO": "areal_agents.algorithms",
    "ReinforcePlusPlus": "areal_agents.algorithms",
    "PPO": "areal_agents.algorithms",
    "DAPO": "areal_agents.algorithms",
    "GSPO": "areal_agents.algorithms",
    "CISPO": "areal_agents.algorithms",
    "SAPO": "areal_agents.algorithms",
}

# subpackages reachable as attributes: aa.models, aa.algorithms, ...
_SUBMODULES = {"models", "algorithms", "engines", "gateway", "envs", "agents", "trainers", "testing",
               "proxy", "rewards"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"areal_agents.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'areal_agents' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
