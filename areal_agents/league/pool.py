"""``OpponentPool``: who the trained policy plays against, one opponent per episode.

A pool mixes three kinds of members, all frozen:

* **snapshots** of a trainable policy, taken every ``snapshot_every`` of its steps (and one of
  its starting weights), each served as its own frozen policy ``"<policy>@<version>"`` by an
  in-process engine holding a copy of the weights at that version; at most ``max_snapshots``
  are kept (the oldest is evicted: no new episode draws it, and its engine is closed once
  its last game ends);
* **scripted players** by name (``"heuristic"``, ``"tit_for_tat"``, ``"random"``; see
  ``areal_agents.league.players``);
* **frozen policies** of the trainer by name (``Policy(frozen=True)``, or an external server:
  ``Policy(endpoint=..., frozen=True)``).

Per training episode the opponent's seat (``seat``, or any seat with ``"any"``) and the member
are drawn from a generator keyed by the run seed and the task seed, so all episodes of a GRPO
group face the same opponent in the same seat; the opponent's seat is never trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from areal_agents.errors import ConfigError

from .sampling import SAMPLING

__all__ = ["OpponentPool"]


@dataclass
class OpponentPool:
    """The opponents of a run (``Trainer(opponents=OpponentPool(...))``; YAML ``opponents:``).

    Args:
        members: scripted player names (``"heuristic"``, ``"random"``...) and names of frozen
            policies in ``Trainer(policies=...)`` (local or ``endpoint``).
        seat: the agent id the opponent plays, or ``"any"``: drawn per task seed among the
            agents whose policy is trainable (so one policy learns every seat).
        snapshot_every: take a snapshot of ``snapshot_of`` every k of its steps (versions), and
            one of its starting weights (version 0); 0 = no snapshots.
        snapshot_of: the trainable policies to snapshot (default: those that play the seats
            the opponent may take). In a seat, the opponent is drawn among the configured
            members and the snapshots of the policy that plays that seat.
        max_snapshots: snapshots kept at most per policy (each holds a full copy of the
            weights).
        sampling: ``"uniform"``, ``"latest"`` (the newest member gets ``latest_share`` of the
            draws) or ``"pfsp"`` (weight ``p_loss ** pfsp_power + 0.05``, from the learner's
            online results against each member, decayed by ``decay`` per game).
        latest_share, pfsp_power, decay: parameters of the sampling schemes.
        league_every: a league evaluation (every player against every other, both seats, on
            ``league_seeds``: win/draw/loss matrix and Elo) inside the trainer's evaluation at
            steps divisible by k (and step 0); 0 = never. Needs ``eval_every`` dividing it.
        league_seeds: held-out seeds of the league games (each ordered pair plays all).

    Raises:
        ConfigError: an unknown sampling scheme, no members and no snapshots, or a count < 0.

    Example:
        >>> OpponentPool(members=["heuristic"], snapshot_every=10, sampling="pfsp").seat
        'any'
    """

    members: list[str] = field(default_factory=list)
    seat: str = "any"
    snapshot_every: int = 0
    snapshot_of: str | list[str] | None = None
    max_snapshots: int = 8
    sampling: str = "uniform"
    latest_share: float = 0.5
    pfsp_power: float = 2.0
    decay: float = 0.98
    league_every: int = 0
    league_seeds: Sequence[int] = range(2_000_000, 2_000_016)

    def __post_init__(self) -> None:
        self.members = list(self.members)
        self.league_seeds = list(self.league_seeds)
        if self.sampling not in SAMPLING:
            raise ConfigError(f"OpponentPool.sampling={self.sampling!r}; choose from {SAMPLING}")
        if min(self.snapshot_every, self.league_every) < 0 or self.max_snapshots < 1:
            raise ConfigError("OpponentPool: snapshot_every and league_every must be >= 0 and "
                              f"max_snapshots >= 1, got {self.snapshot_every}, "
                              f"{self.league_every}, {self.max_snapshots}")
        if not self.members and not self.snapshot_every:
            raise ConfigError("OpponentPool is empty: give members=[...] (scripted players or "
                              "frozen policies) and/or snapshot_every > 0")
        if len(set(self.members)) != len(self.members):
            raise ConfigError(f"OpponentPool.members has duplicates: {self.members}")
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"OpponentPool.decay must be in (0, 1], got {self.decay}")
