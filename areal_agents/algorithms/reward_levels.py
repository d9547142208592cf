"""Reward levels: process (per turn), agent and team rewards, and how a role weighs them.

An env reports what a step's reward is made of in the rewarded agent's info, next to its
scalar reward::

    rewards[agent] = 1.1                                     # the env's own combination
    infos[agent]["reward_levels"] = {"process": 0.1, "team": 1.0}   # a missing level is 0

* ``process``: the quality of this turn's action (a legal move, a well-formed answer);
* ``agent``: this agent's own outcome (its task solved, its score);
* ``team``: the outcome every agent of the team shares (the game won, the code passing).

Without weights the scalar reward is trained, as for any env. With weights for a role
(``Trainer(reward_levels={"speaker": {"process": 0.5, "agent": 1.0, "team": 0.0}})``, or
``reward_levels:`` in YAML) that role is trained on ``sum(weight[l] * level[l])`` per step
instead; the step stays where it was, so a process reward still lands on the turn that earned
it (``Sample.token_rewards``, read by PPO's GAE) and GRPO/RLOO see the per-step sum. A step
whose info carries no levels keeps its scalar reward. Every level's episode total is logged per
role (``train/<agent>/reward_<level>``), weighted or not.

Example:
    >>> w = LevelWeights.of({"process": 0.5, "team": 2.0})
    >>> w.combine({"process": 1.0, "agent": 3.0, "team": 1.0})
    5.5
    >>> reweigh([1.0, 7.0], [{"team": 1.0}, {}], w)  # the second step has no levels
    [2.0, 7.0]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from areal_agents.episode import Episode

__all__ = ["LEVELS", "LevelWeights", "apply_reward_levels", "level_totals",
           "resolve_reward_levels", "reweigh", "step_levels"]

LEVELS: tuple[str, ...] = ("process", "agent", "team")
INFO_KEY = "reward_levels"


@dataclass(frozen=True)
class LevelWeights:
    """One role's weights of the three reward levels (a level left out weighs 1)."""

    process: float = 1.0
    agent: float = 1.0
    team: float = 1.0

    @classmethod
    def of(cls, value: LevelWeights | Mapping[str, float], where: str = "reward_levels"
           ) -> LevelWeights:
        """``value`` as ``LevelWeights`` (a dict names some of ``LEVELS``).

        Raises:
            ValueError: an unknown level or a weight that is not a finite number.
        """
        if isinstance(value, LevelWeights):
            return value
        unknown = sorted(set(value) - set(LEVELS))
        if unknown:
            raise ValueError(f"{where}: unknown reward level(s) {unknown}; the levels are "
                             f"{list(LEVELS)}")
        return cls(**{k: _number(v, f"{where}.{k}") for k, v in value.items()})

    def combine(self, levels: Mapping[str, float]) -> float:
        """``sum(weight[l] * levels[l])`` over the levels present."""
        return float(sum(getattr(self, k) * v for k, v in levels.items()))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def resolve_reward_levels(value: Mapping[str, LevelWeights | Mapping[str, float]] | None,
                          agents: Sequence[str]) -> dict[str, LevelWeights]:
    """A trainer's ``reward_levels`` as ``{agent_id: LevelWeights}`` (None: ``{}``).

    Raises:
        ConfigError: an agent id not among ``agents``, an unknown level or a weight that is
            not a finite number.
    """
    from areal_agents.errors import ConfigError

    unknown = sorted(set(value or {}) - set(agents))
    if unknown:
        raise ConfigError(f"reward_levels names agent(s) {unknown}; the env's agents are "
                          f"{list(agents)} (weights are per role: {{agent_id: {{level: w}}}})")
    try:
        return {a: LevelWeights.of(w, f"reward_levels.{a}") for a, w in (value or {}).items()}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def step_levels(info: Mapping[str, Any]) -> dict[str, float]:
    """The validated ``info["reward_levels"]`` of one step (``{}`` when absent).

    Raises:
        ValueError: not a dict, an unknown level, or a value that is not a finite number.
    """
    levels = info.get(INFO_KEY)
    if levels is None:
        return {}
    if not isinstance(levels, Mapping):
        raise ValueError(f"info[{INFO_KEY!r}] must be a dict {{level: reward}} with levels "
                         f"{list(LEVELS)}, got {type(levels).__name__}")
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown:
        raise ValueError(f"info[{INFO_KEY!r}] has unknown level(s) {unknown}; the levels are "
                         f"{list(LEVELS)}")
    return {k: _number(v, f"info[{INFO_KEY!r}][{k!r}]") for k, v in levels.items()}


def level_totals(steps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each level's sum over an agent's rewarded steps (every level, 0.0 when absent)."""
    return {k: float(sum(s.get(k, 0.0) for s in steps)) for k in LEVELS}


def reweigh(rewards: Sequence[float], levels: Sequence[Mapping[str, float]],
            weights: LevelWeights) -> list[float]:
    """Per step: ``weights.combine(levels)`` where the step has levels, else its reward."""
    return [weights.combine(lv) if lv else float(r)
            for r, lv in zip(rewards, levels, strict=True)]


def apply_reward_levels(episode: Episode, weights: Mapping[str, LevelWeights]) -> Episode:
    """``episode`` with each weighted role's step rewards (and return) recombined from their
    levels (``reweigh``); the other roles' rewards unchanged. A new record; ``episode`` is
    left as the env reported it."""
    if not weights:
        return episode
    rewards, returns = dict(episode.rewards), dict(episode.returns)
    for agent, w in weights.items():
        steps = episode.reward_levels.get(agent)
        if agent not in rewards or not steps:
            continue
        rewards[agent] = reweigh(rewards[agent], steps, w)
        returns[agent] = float(sum(rewards[agent]))
    return dataclasses.replace(episode, rewards=rewards, returns=returns)
