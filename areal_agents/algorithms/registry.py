"""The one table of algorithm names: ``name -> class``, used by the trainer, the run config and
the CLI. Add an algorithm here and every one of them accepts its name."""

from __future__ import annotations

from typing import Any

from areal_agents.algorithms.group_relative import DAPO, GRPO, GSPO, RLOO, DrGRPO
from areal_agents.algorithms.objects import PolicyGradient
from areal_agents.algorithms.soft_clip import CISPO, SAPO
from areal_agents.algorithms.token_level import PPO, ReinforcePlusPlus

ALGORITHMS: dict[str, type[PolicyGradient]] = {
    "grpo": GRPO,
    "drgrpo": DrGRPO,
    "dapo": DAPO,
    "rloo": RLOO,
    "reinforce++": ReinforcePlusPlus,
    "gspo": GSPO,
    "ppo": PPO,
    "cispo": CISPO,
    "sapo": SAPO,
}


def check_algorithm(name: str) -> str:
    """``name`` if it is in ``ALGORITHMS`` (exact spelling, as configs write it).

    Raises:
        ValueError: unknown name (lists the allowed ones).
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {list(ALGORITHMS)}")
    return name


def resolve(algorithm: Any, **kwargs: Any) -> Any:
    """An algorithm object from an object (returned as is) or a name in ``ALGORITHMS``
    (case-insensitive), built with ``kwargs``.

    Raises:
        ValueError: unknown name (lists the allowed ones), or ``kwargs`` given with an object.

    Example:
        >>> resolve("DAPO", clip_eps=0.1).clip_eps
        0.1
    """
    if not isinstance(algorithm, str):
        if kwargs:
            raise ValueError(f"got an algorithm object ({type(algorithm).__name__}) and "
                             f"arguments {sorted(kwargs)}; set them on the object instead")
        return algorithm
    key = algorithm.lower()
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; allowed: {list(ALGORITHMS)}")
    return ALGORITHMS[key](**kwargs)
