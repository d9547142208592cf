"""``ScalingRule``: how many inference replicas a policy wants, from its measured queue depth.

A pure state machine (no Ray, no engines, no clock of its own): the caller feeds it one
sample at a time, ``update(now, queue_depth, num_replicas)``, and gets the count it wants back.
The rule, per replica::

    load = queue_depth / num_replicas          # requests waiting or running per replica
    up:   load >= scale_up_queue   for up_after_s   (every sample of that window)  -> n + 1
    down: load <= scale_down_queue for down_after_s (every sample of that window)  -> n - 1
    always clamped to [min_replicas, max_replicas]; after a change, cooldown_s of no change

Hysteresis comes from the gap between the two thresholds (``scale_down_queue <
scale_up_queue``), the sustained windows and the cooldown, so a queue that oscillates around
one threshold does not make replicas come and go. A window restarts whenever a sample falls on
the other side of its threshold, and after every change (the new count changes the load).

Example:
    >>> rule = ScalingRule(AutoscaleSettings(min_replicas=1, max_replicas=3,
    ...                    scale_up_queue=4, scale_down_queue=1, up_after_s=2, down_after_s=5,
    ...                    cooldown_s=0))
    >>> n = 1
    >>> for t in range(4):  # 8 requests waiting or running, for 3 s
    ...     n = rule.update(float(t), queue_depth=8, num_replicas=n)
    ...     print(t, n)
    0 1
    1 1
    2 2
    3 2
    >>> rule.update(4.0, queue_depth=0, num_replicas=5)  # above max_replicas: back to the bound
    3
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from areal_agents.errors import ConfigError

__all__ = ["AutoscaleSettings", "ScalingRule"]


@dataclass(frozen=True)
class AutoscaleSettings:
    """One policy's auto-scaling of inference replicas (see the module docstring's rule).

    Args:
        min_replicas: replicas kept at least (a lost one is replaced up to this count).
        max_replicas: replicas at most.
        scale_up_queue: requests per replica (waiting + running) at or above which the
            policy scales up once it held for ``up_after_s``.
        scale_down_queue: requests per replica at or below which it scales down once it held
            for ``down_after_s``; must be below ``scale_up_queue`` (the hysteresis band).
        up_after_s: seconds the high load must last.
        down_after_s: seconds the low load must last.
        cooldown_s: seconds after a change during which no other change is made.
        interval_s: seconds between two queue samples (the sampler's period).

    Raises:
        ConfigError: ``min_replicas < 1``, ``max_replicas < min_replicas``, a negative time,
            or ``scale_down_queue >= scale_up_queue``.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    scale_up_queue: float = 8.0
    scale_down_queue: float = 1.0
    up_after_s: float = 10.0
    down_after_s: float = 60.0
    cooldown_s: float = 30.0
    interval_s: float = 1.0

    def __post_init__(self) -> None:
        owner = "autoscale"
        if isinstance(self.min_replicas, bool) or not isinstance(self.min_replicas, int) \
                or self.min_replicas < 1:
            raise ConfigError(f"{owner}.min_replicas must be an integer >= 1, got "
                              f"{self.min_replicas!r}")
        if not isinstance(self.max_replicas, int) or self.max_replicas < self.min_replicas:
            raise ConfigError(f"{owner}.max_replicas={self.max_replicas!r} must be an integer >= "
                              f"min_replicas={self.min_replicas}")
        for name in ("up_after_s", "down_after_s", "cooldown_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{owner}.{name} must be >= 0, got {getattr(self, name)}")
        if not self.interval_s > 0:
            raise ConfigError(f"{owner}.interval_s must be > 0, got {self.interval_s}")
        if not self.scale_down_queue < self.scale_up_queue:
            raise ConfigError(f"{owner}: scale_down_queue={self.scale_down_queue} must be below "
                              f"scale_up_queue={self.scale_up_queue} (the gap is the hysteresis "
                              "band); lower scale_down_queue")

    @classmethod
    def of(cls, value: AutoscaleSettings | dict[str, Any], policy: str) -> AutoscaleSettings:
        """``value`` as settings (a dict gives its fields).

        Raises:
            ConfigError: unknown fields (named, with the known ones) or invalid values.
        """
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"autoscale.{policy} must be a dict of {[f.name for f in fields(cls)]}"
                              f", got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"autoscale.{policy}: unknown field(s) {unknown}; known: "
                              f"{sorted(known)}")
        return cls(**value)


class ScalingRule:
    """The replica count one policy wants (module docstring); feed it samples in time order.

    Args:
        settings: thresholds, windows and bounds.
    """

    def __init__(self, settings: AutoscaleSettings) -> None:
        self.settings = settings
        self._high_since: float | None = None  # first sample of the current high run
        self._low_since: float | None = None
        self._changed_at: float | None = None

    def update(self, now: float, queue_depth: float, num_replicas: int) -> int:
        """Record the policy's total queue depth (waiting + running requests) at ``now`` with
        ``num_replicas`` replicas (the count the caller is aiming at), and return the count
        wanted now: at most one step away from ``num_replicas``, except a count outside the
        bounds, which returns to the nearest bound at once."""
        s = self.settings
        load = queue_depth / max(1, num_replicas)
        self._high_since = (self._high_since if self._high_since is not None else now) \
            if load >= s.scale_up_queue else None
        self._low_since = (self._low_since if self._low_since is not None else now) \
            if load <= s.scale_down_queue else None
        if num_replicas < s.min_replicas or num_replicas > s.max_replicas:
            return self._change(now, min(max(num_replicas, s.min_replicas), s.max_replicas))
        if self._changed_at is not None and now - self._changed_at < s.cooldown_s:
            return num_replicas
        if (self._high_since is not None and now - self._high_since >= s.up_after_s
                and num_replicas < s.max_replicas):
            return self._change(now, num_replicas + 1)
        if (self._low_since is not None and now - self._low_since >= s.down_after_s
                and num_replicas > s.min_replicas):
            return self._change(now, num_replicas - 1)
        return num_replicas

    def _change(self, now: float, count: int) -> int:
        self._changed_at = now
        self._high_since = self._low_since = None  # the new count changes the per-replica load
        return count
