"""``ScalingRule``: how many inference replicas a policy wants, from its measured queue depth
or request latency.

A pure state machine (no Ray, no engines, no clock of its own): the caller feeds it one
sample at a time, ``update(now, queue_depth, num_replicas, latency_s)``, and gets the count it
wants back. ``metric`` chooses the signal. ``"queue"`` (the default), per replica::

    load = queue_depth / num_replicas          # requests waiting or running per replica
    up:   load >= scale_up_queue   for up_after_s   (every sample of that window)  -> n + 1
    down: load <= scale_down_queue for down_after_s (every sample of that window)  -> n - 1

``"latency"``: ``latency_s`` is the ``latency_quantile`` of the requests that ended within the
last ``latency_window_s`` (``LatencyWindow``; the scaler times each replica's ``generate``)::

    up:   latency_s >= scale_up_latency_s   for up_after_s    -> n + 1
    down: latency_s <= scale_down_latency_s for down_after_s  -> n - 1
          (no request ended within the window counts as low only while queue_depth is 0:
          idle; with requests in flight and none ending, the count holds)

Either way: always clamped to [min_replicas, max_replicas]; after a change, cooldown_s of no
change. Hysteresis comes from the gap between the two thresholds (``scale_down_* <
scale_up_*``), the sustained windows and the cooldown, so a signal that oscillates around one
threshold does not make replicas come and go. A window restarts whenever a sample falls on
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
    >>> window = LatencyWindow(window_s=30.0)
    >>> for t, latency in enumerate([0.2, 0.4, 3.0, 0.3]):
    ...     window.record(float(t), latency)
    >>> window.quantile(3.0, 0.5), window.quantile(3.0, 0.9), window.quantile(40.0, 0.9)
    (0.3, 3.0, None)
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

from areal_agents.errors import ConfigError

__all__ = ["METRICS", "AutoscaleSettings", "LatencyWindow", "ScalingRule"]

METRICS = ("queue", "latency")
"""The signals a ``ScalingRule`` can scale on (``AutoscaleSettings.metric``)."""


@dataclass(frozen=True)
class AutoscaleSettings:
    """One policy's auto-scaling of inference replicas (see the module docstring's rule).

    Args:
        min_replicas: replicas kept at least (a lost one is replaced up to this count).
        max_replicas: replicas at most.
        metric: ``"queue"`` (scale on ``scale_*_queue``) or ``"latency"`` (on
            ``scale_*_latency_s``); the other pair of thresholds is unused.
        scale_up_queue: requests per replica (waiting + running) at or above which the
            policy scales up once it held for ``up_after_s``.
        scale_down_queue: requests per replica at or below which it scales down once it held
            for ``down_after_s``; must be below ``scale_up_queue`` (the hysteresis band).
        scale_up_latency_s: request latency (seconds, the ``latency_quantile`` over
            ``latency_window_s``) at or above which the policy scales up once it held for
            ``up_after_s``.
        scale_down_latency_s: latency at or below which it scales down once it held for
            ``down_after_s``; must be below ``scale_up_latency_s``.
        latency_quantile: which quantile of the window's latencies is compared (0.5: the
            median, 0.9: p90), in (0, 1].
        latency_window_s: seconds of finished requests the quantile is taken over.
        up_after_s: seconds the high load must last.
        down_after_s: seconds the low load must last.
        cooldown_s: seconds after a change during which no other change is made.
        interval_s: seconds between two samples (the sampler's period).

    Raises:
        ConfigError: ``min_replicas < 1``, ``max_replicas < min_replicas``, an unknown
            ``metric``, a negative time, a quantile outside (0, 1], or a down threshold not
            below its up threshold.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    metric: str = "queue"
    scale_up_queue: float = 8.0
    scale_down_queue: float = 1.0
    scale_up_latency_s: float = 10.0
    scale_down_latency_s: float = 2.0
    latency_quantile: float = 0.9
    latency_window_s: float = 30.0
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
        if self.metric not in METRICS:
            raise ConfigError(f"{owner}.metric={self.metric!r}; choose one of {list(METRICS)}")
        for name in ("up_after_s", "down_after_s", "cooldown_s", "scale_down_latency_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{owner}.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("interval_s", "latency_window_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{owner}.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.latency_quantile <= 1:
            raise ConfigError(f"{owner}.latency_quantile must be in (0, 1], got "
                              f"{self.latency_quantile}")
        for kind in ("queue", "latency_s"):
            down, up = f"scale_down_{kind}", f"scale_up_{kind}"
            if not getattr(self, down) < getattr(self, up):
                raise ConfigError(f"{owner}: {down}={getattr(self, down)} must be below "
                                  f"{up}={getattr(self, up)} (the gap is the hysteresis "
                                  f"band); lower {down}")

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

    def update(self, now: float, queue_depth: float, num_replicas: int,
               latency_s: float | None = None) -> int:
        """Record the policy's total queue depth (waiting + running requests) and, for
        ``metric="latency"``, its latency quantile (None: no request ended within the window)
        at ``now`` with ``num_replicas`` replicas (the count the caller is aiming at), and
        return the count wanted now: at most one step away from ``num_replicas``, except a
        count outside the bounds, which returns to the nearest bound at once."""
        s = self.settings
        high, low = self._sides(queue_depth, num_replicas, latency_s)
        self._high_since = (self._high_since if self._high_since is not None else now) \
            if high else None
        self._low_since = (self._low_since if self._low_since is not None else now) \
            if low else None
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

    def _sides(self, queue_depth: float, num_replicas: int,
               latency_s: float | None) -> tuple[bool, bool]:
        """Whether this sample is above the up threshold, and whether below the down one."""
        s = self.settings
        if s.metric == "latency":
            if latency_s is None:  # nothing ended within the window: idle, or all stuck
                return False, queue_depth == 0
            return latency_s >= s.scale_up_latency_s, latency_s <= s.scale_down_latency_s
        load = queue_depth / max(1, num_replicas)
        return load >= s.scale_up_queue, load <= s.scale_down_queue

    def _change(self, now: float, count: int) -> int:
        self._changed_at = now
        self._high_since = self._low_since = None  # the new count changes the per-replica load
        return count


class LatencyWindow:
    """The latencies of the requests that ended within the last ``window_s`` seconds.

    Args:
        window_s: how far back ``quantile`` looks (seconds of the caller's clock).
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (ended at, latency), in order

    def record(self, now: float, latency_s: float) -> None:
        """A request that took ``latency_s`` seconds ended at ``now`` (times in order)."""
        self._samples.append((now, latency_s))

    def quantile(self, now: float, q: float) -> float | None:
        """The ``q`` quantile (nearest rank: the smallest latency with at least ``q`` of the
        window at or below it) of the requests that ended in ``(now - window_s, now]``; None
        when there are none. Older samples are dropped."""
        while self._samples and self._samples[0][0] <= now - self.window_s:
            self._samples.popleft()
        latencies = sorted(latency for _, latency in self._samples)
        if not latencies:
            return None
        return latencies[max(0, math.ceil(q * len(latencies)) - 1)]

    def __len__(self) -> int:
        return len(self._samples)
