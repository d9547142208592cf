"""Elo ratings fitted to a league's game results (a Bradley-Terry fit on the Elo scale).

A game between ``a`` and ``b`` with score ``s`` for ``a`` (1 win, 0.5 draw, 0 loss) has the
expected score ``E = 1 / (1 + 10 ** ((r_b - r_a) / 400))``. ``fit_elo`` finds the ratings that
maximise the likelihood of all results at once (order-free, unlike online Elo updates), with a
weak Gaussian prior around ``base`` (``prior_games`` virtual draws against a ``base``-rated
player) so that a player who won or lost every game gets a finite rating.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["expected_score", "fit_elo"]

SCALE = 400.0 / math.log(10.0)
"""Elo points per natural-log unit of odds."""


def expected_score(r_a: float, r_b: float) -> float:
    """``a``'s expected score against ``b`` under the Elo model.

    Example:
        >>> round(expected_score(1400, 1000), 3)
        0.909
    """
    return 1.0 / (1.0 + 10.0 ** ((r_b - r_a) / 400.0))


def fit_elo(results: Iterable[tuple[str, str, float]], players: Sequence[str] | None = None, *,
            base: float = 1000.0, prior_games: float = 1.0, iterations: int = 2000
            ) -> dict[str, float]:
    """Maximum-likelihood Elo ratings of ``results`` ``(a, b, score of a)``.

    Args:
        results: games as ``(player a, player b, a's score in [0, 1])``.
        players: every player to rate (those without games get ``base``); default: the
            players that appear in ``results``.
        base: the prior's centre (and the mean rating of players with symmetric results).
        prior_games: weight of the prior, as virtual draws of each player against a
            ``base``-rated player (> 0 keeps all-win / all-loss ratings finite).
        iterations: Newton steps per player (coordinate-wise; converges in tens).

    Returns:
        ``{player: rating}``.

    Raises:
        ValueError: a score outside [0, 1], a game of a player against itself, or
            ``prior_games <= 0``.

    Example:
        >>> r = fit_elo([("a", "b", 1.0), ("a", "b", 1.0), ("a", "b", 0.0)])
        >>> r["a"] > 1000 > r["b"]
        True
    """
    if prior_games <= 0:
        raise ValueError(f"prior_games must be > 0 (keeps ratings finite), got {prior_games}")
    games = list(results)
    names = list(players) if players is not None else []
    for a, b, s in games:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"score {s} of {a!r} vs {b!r} is not in [0, 1]")
        if a == b:
            raise ValueError(f"a game of {a!r} against itself cannot be rated")
        names += [p for p in (a, b) if p not in names]
    theta = dict.fromkeys(names, 0.0)  # log-odds units around base
    by_player: dict[str, list[tuple[str, float]]] = {p: [] for p in names}
    for a, b, s in games:
        by_player[a].append((b, s))
        by_player[b].append((a, 1.0 - s))
    for _ in range(iterations):
        delta = 0.0
        for p in names:
            # prior: prior_games draws against theta = 0; gradient and (negative) curvature
            e0 = 1.0 / (1.0 + math.exp(-theta[p]))
            grad, hess = prior_games * (0.5 - e0), prior_games * e0 * (1 - e0)
            for q, s in by_player[p]:
                e = 1.0 / (1.0 + math.exp(theta[q] - theta[p]))
                grad += s - e
                hess += e * (1 - e)
            step = grad / hess
            theta[p] += step
            delta = max(delta, abs(step))
        if delta < 1e-10:
            break
    return {p: base + SCALE * theta[p] for p in names}
