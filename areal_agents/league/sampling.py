"""Opponent sampling: per-member weights (uniform, latest-heavy, PFSP) and seeded draws.

Pure functions. A draw is keyed by a string (the trainer uses ``"<run seed>/<task seed>"``),
so every episode of a GRPO group — one task seed — draws the same opponent and seat.

PFSP (prioritised fictitious self-play, AlphaStar): member ``m`` gets weight
``f(p_loss(m)) = p_loss(m) ** power + floor``, where ``p_loss(m)`` is the learner's estimated
probability of losing to ``m`` (draws count half), from decayed online counts with one
virtual draw as prior; ``floor`` keeps every member drawable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["SAMPLING", "MemberRecord", "draw_index", "member_weights", "unit_float"]

Sampling = Literal["uniform", "latest", "pfsp"]
SAMPLING: tuple[str, ...] = ("uniform", "latest", "pfsp")
"""The sampling schemes of ``OpponentPool.sampling``."""


@dataclass
class MemberRecord:
    """The learner's decayed results against one pool member (from the learner's side)."""

    wins: float = 0.0
    draws: float = 0.0
    losses: float = 0.0

    def add(self, outcome: str, decay: float = 1.0) -> None:
        """Count one game (``"win"``, ``"draw"`` or ``"loss"`` of the learner); older games
        are multiplied by ``decay`` first (1.0 keeps plain counts)."""
        if outcome not in ("win", "draw", "loss"):
            raise ValueError(f"outcome must be 'win', 'draw' or 'loss', got {outcome!r}")
        self.wins, self.draws, self.losses = (decay * self.wins, decay * self.draws,
                                              decay * self.losses)
        setattr(self, {"win": "wins", "draw": "draws", "loss": "losses"}[outcome],
                getattr(self, {"win": "wins", "draw": "draws", "loss": "losses"}[outcome]) + 1)

    @property
    def games(self) -> float:
        return self.wins + self.draws + self.losses

    @property
    def p_loss(self) -> float:
        """Estimated probability that the learner loses (a draw is half a loss; prior: one
        virtual draw, so an unseen member has 0.5).

        Example:
            >>> MemberRecord(wins=0, draws=0, losses=3).p_loss
            0.875
        """
        return (self.losses + 0.5 * self.draws + 0.5) / (self.games + 1.0)


def member_weights(records: Sequence[MemberRecord], sampling: str, *,
                   latest_share: float = 0.5, pfsp_power: float = 2.0,
                   pfsp_floor: float = 0.05) -> list[float]:
    """Unnormalised draw weights of pool members listed oldest first.

    ``uniform``: all equal. ``latest``: the last member gets ``latest_share`` of the mass, the
    others share the rest equally (a one-member pool: all of it). ``pfsp``:
    ``p_loss ** pfsp_power + pfsp_floor``.

    Raises:
        ValueError: an unknown scheme, an empty pool or ``latest_share`` outside (0, 1].

    Example:
        >>> member_weights([MemberRecord()] * 3, "latest")
        [0.25, 0.25, 0.5]
    """
    if not records:
        raise ValueError("the opponent pool is empty; give members= or snapshot_every > 0")
    n = len(records)
    if sampling == "uniform":
        return [1.0] * n
    if sampling == "latest":
        if not 0.0 < latest_share <= 1.0:
            raise ValueError(f"latest_share must be in (0, 1], got {latest_share}")
        if n == 1:
            return [1.0]
        return [(1.0 - latest_share) / (n - 1)] * (n - 1) + [latest_share]
    if sampling == "pfsp":
        return [r.p_loss ** pfsp_power + pfsp_floor for r in records]
    raise ValueError(f"unknown sampling {sampling!r}; choose from {SAMPLING}")


def unit_float(key: str) -> float:
    """A float in [0, 1) from ``key``, equal in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)


def draw_index(key: str, weights: Sequence[float]) -> int:
    """The index drawn with probability ``weights[i] / sum(weights)``, from ``unit_float(key)``.

    Raises:
        ValueError: empty weights, a negative weight or a zero total.

    Example:
        >>> draw_index("seed/7", [0.0, 1.0, 0.0])
        1
    """
    total = sum(weights)
    if not weights or min(weights) < 0 or total <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    u, acc = unit_float(key) * total, 0.0
    for i, w in enumerate(weights):
        acc += w
        if u < acc:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)
