"""Rollout: per-policy staleness admission and the concurrent episode controller."""

from .controller import RolloutController, RolloutFailed
from .groups import Group
from .staleness import StalenessControl

__all__ = ["Group", "RolloutController", "RolloutFailed", "StalenessControl"]
