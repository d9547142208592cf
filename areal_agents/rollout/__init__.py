"""Rollout: per-policy staleness admission and the concurrent episode controller."""

from .controller import Group, RolloutController, RolloutFailed
from .staleness import StalenessControl

__all__ = ["Group", "RolloutController", "RolloutFailed", "StalenessControl"]
