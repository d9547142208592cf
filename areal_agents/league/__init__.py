"""Opponent pools and leagues: pool members, opponent sampling, Elo, league evaluation.

``OpponentPool`` configures the opponents of a run; the trainer's side (snapshots, the
per-episode draw, league games) is ``areal_agents.trainers.league``.
"""

from .elo import expected_score, fit_elo
from .pool import OpponentPool
from .sampling import SAMPLING, MemberRecord, draw_index, member_weights

__all__ = ["SAMPLING", "MemberRecord", "OpponentPool", "draw_index", "expected_score", "fit_elo",
           "member_weights"]
