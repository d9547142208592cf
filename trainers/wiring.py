"""How a ``Trainer`` is wired: the agent -> policy map and per-policy algorithm objects.

The backend registry lives in ``backends.py`` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from areal_agents.agent import Agent
from areal_agents.errors import ConfigError

from .backends import BACKENDS, backend_factory, register_backend
from .policy import Policy

__all__ = ["BACKENDS", "backend_factory", "policy_algorithm", "register_backend",
           "resolve_policy_map"]


def resolve_policy_map(policy_map: Mapping[str, str] | Callable[[str], str],
                       possible_agents: list[str], policies: Mapping[str, Policy],
                       fixed: Mapping[str, Agent]) -> dict[str, str]:
    """``{agent_id: policy}`` for every agent of the env not played by a fixed agent.

    Raises:
        ValueError: an agent is missing or unknown, or a policy name is unknown (lists both).
    """
    mapping = ({a: policy_map(a) for a in possible_agents if a not in fixed}
               if callable(policy_map) else dict(policy_map))
    unknown = sorted(set(mapping) - set(possible_agents))
    missing = sorted(set(possible_agents) - set(mapping) - set(fixed))
    if unknown or missing:
        raise ValueError(f"policy_map does not fit the env: unknown agents {unknown}, missing "
                         f"agents {missing}; env.possible_agents={possible_agents}, policy_map "
                         f"keys={sorted(mapping)}, fixed agents={sorted(fixed)}")
    bad = sorted({p for p in mapping.values() if p not in policies})
    if bad:
        raise ValueError(f"policy_map names unknown policies {bad}; policies={sorted(policies)}")
    return mapping


def policy_algorithm(base: Any, policy: Policy, name: str) -> Any:
    """``base`` itself, or a copy with ``policy.algorithm_params`` applied (own state).

    Raises:
        ConfigError: an override names a field the algorithm does not have (lists them).
    """
    if not policy.algorithm_params:
        return base
    import dataclasses

    if not dataclasses.is_dataclass(base):
        raise ConfigError(f"policies.{name}.algorithm_params needs a dataclass algorithm (as in "
                          f"areal_agents.algorithms); {type(base).__name__} is not one: give "
                          "this policy's settings to the algorithm object itself")
    fields = {f.name for f in dataclasses.fields(base) if f.init} - {"ema_baselines"}
    unknown = sorted(set(policy.algorithm_params) - fields)
    if unknown:
        raise ConfigError(f"policies.{name}.algorithm_params names unknown fields {unknown}; "
                          f"{type(base).__name__} has {sorted(fields)}")
    return dataclasses.replace(base, **policy.algorithm_params,
                               ema_baselines=dict(getattr(base, "ema_baselines", {})))
