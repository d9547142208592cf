"""Rollout: per-policy staleness admission and the concurrent episode controller."""

from .controller import AllFiltered, RolloutController, RolloutFailed
from .groups import Group
from .staleness import StalenessControl

__all__ = ["AllFiltered", "Group", "RolloutController", "RolloutFailed", "StalenessControl"]
