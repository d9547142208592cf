"""Scripted pool members by name: functions and classes of ``areal_agents.agents.players``.

A name resolves to the player of that exact name (``"tictactoe_heuristic"``) or, shorter, to
the one player whose name ends with ``_<name>`` (``"heuristic"``, ``"tit_for_tat"``; classes by their snake-case name: ``"fair"`` is
``NegotiationFair``); when
several players share the suffix, the one whose prefix matches the env id wins
(``"always_defect"`` in ``PrisonersDilemma-v0`` is ``pd_always_defect``). ``"random"`` is a
uniformly random legal action from the env's own ``sample_action(agent)``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from areal_agents.agent import Agent
from areal_agents.agents.scripted import ScriptedAgent

__all__ = ["RANDOM", "RandomAgent", "player_names", "resolve_player", "scripted_agent"]

RANDOM = "random"
"""The pool member that plays ``env.sample_action(seat)``."""

_ENV_PREFIXES = {"prisonersdilemma": "pd"}


def player_names() -> list[str]:
    """Every scripted player of ``areal_agents.agents.players`` (functions and classes)."""
    from areal_agents.agents import players

    return sorted(n for n, v in vars(players).items()
                  if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
                  and v.__module__ == players.__name__)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def resolve_player(name: str, env_id: str | None = None) -> str:
    """The full player name ``name`` stands for (``RANDOM`` stays ``RANDOM``).

    Raises:
        ValueError: no player or several players match (lists them).

    Example:
        >>> resolve_player("heuristic")
        'tictactoe_heuristic'
    """
    if name == RANDOM:
        return name
    names = player_names()
    if name in names:
        return name
    found = [n for n in names if _snake(n).endswith("_" + name.lower())]
    if len(found) > 1 and env_id:
        family = env_id.split("-")[0].lower()
        prefix = _ENV_PREFIXES.get(family, family)
        found = [n for n in found if _snake(n).startswith(prefix)] or found
    if len(found) != 1:
        raise ValueError(f"opponent {name!r} matches {'no' if not found else 'several'} scripted "
                         f"players {found}; name one of {names} or {RANDOM!r}")
    return found[0]


class RandomAgent(Agent):
    """Plays ``sample_action(seat)`` of the env it sits in (a uniformly random legal move)."""

    def __init__(self, sample: Callable[[], Any]) -> None:
        self.sample = sample

    async def act(self, observation: Any) -> Any:
        return self.sample()


def scripted_agent(name: str, env: Any, seat: str) -> Agent:
    """A fresh agent of resolved player ``name`` for ``seat`` of ``env`` (classes such as
    ``NegotiationFair`` are instantiated: one instance per seat and episode).

    Raises:
        ValueError: ``RANDOM`` for an env without ``sample_action``.
    """
    if name == RANDOM:
        if not hasattr(env, "sample_action"):
            raise ValueError(f"opponent 'random' needs {type(env).__name__}.sample_action(agent)")
        return RandomAgent(lambda: env.sample_action(seat))
    from areal_agents.agents import players

    player = getattr(players, name)
    return ScriptedAgent(player() if inspect.isclass(player) else player)
