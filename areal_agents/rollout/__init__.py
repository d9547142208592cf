"""Rollout: per-policy staleness admission and the concurrent episode controller."""

from .controller import AllFiltered, Deadlocked, RolloutController, RolloutFailed
from .groups import Group
from .staleness import StalenessControl

__all__ = ["AllFiltered", "Deadlocked", "Group", "RolloutController", "RolloutFailed",
           "StalenessControl"]
