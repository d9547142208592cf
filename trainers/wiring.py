"""How a ``Trainer`` is wired: training backends by name and the agent -> policy map."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from areal_agents.agent import Agent
from areal_agents.errors import ConfigError

from .policy import Policy

BACKENDS: dict[str, str] = {
    "fsdp": "areal_agents.trainers.fsdp.engine:FSDPEngine",
    "archon": "areal_agents.trainers.archon:ArchonEngine",
    "megatron": "areal_agents.trainers.megatron:MegatronEngine",
}
"""Backend name -> ``"module:factory"``; ``factory(model, lr=..., lora=..., **kw)`` is a
``TrainEngine``. Add a backend with ``BACKENDS["name"] = "pkg.module:Factory"``."""


def backend_factory(name: str) -> Callable[..., Any]:
    """The engine class registered for backend ``name``.

    Raises:
        ConfigError: unknown or not importable backend (names the allowed ones).
    """
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; allowed: {sorted(BACKENDS)}")
    module, _, attr = BACKENDS[name].partition(":")
    try:
        return getattr(__import__(module, fromlist=[attr]), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"backend {name!r} is not available here ({exc}); use another of "
                          f"{sorted(BACKENDS)}") from exc


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
