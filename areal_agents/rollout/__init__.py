"""Rollout: per-policy staleness admission and the concurrent episode controller."""

from .controller import Group, RolloutController
from .staleness import StalenessControl

__all__ = ["Group", "RolloutController", "StalenessControl"]
