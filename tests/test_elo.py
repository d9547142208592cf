"""Elo fit and opponent sampling (pure functions of areal_agents.league)."""

from __future__ import annotations

import random

import pytest

from areal_agents.league import MemberRecord, draw_index, expected_score, fit_elo, member_weights


def synthetic_results(strength: dict[str, float], games: int, seed: int = 0):
    """Games between every pair, won with the Elo model's probability of the true ratings."""
    rng = random.Random(seed)
    names = list(strength)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for _ in range(games):
                out.append((a, b, float(rng.random() < expected_score(strength[a], strength[b]))))
    return out


def test_fit_recovers_a_known_ordering_and_gaps():
    truth = {"weak": 800.0, "mid": 1000.0, "strong": 1200.0, "best": 1500.0}
    ratings = fit_elo(synthetic_results(truth, 400), prior_games=0.01)
    assert sorted(ratings, key=ratings.get) == ["weak", "mid", "strong", "best"]
    # gaps within ~40 points of the truth with 400 games per pair
    for a, b in (("weak", "mid"), ("mid", "strong"), ("strong", "best")):
        assert abs((ratings[b] - ratings[a]) - (truth[b] - truth[a])) < 40


def test_symmetric_results_give_equal_ratings_at_base():
    results = [("a", "b", 1.0), ("a", "b", 0.0), ("b", "c", 0.5), ("c", "a", 0.5)]
    ratings = fit_elo(results, ["a", "b", "c", "idle"], base=1500.0)
    assert ratings == pytest.approx(dict.fromkeys("abc", 1500.0) | {"idle": 1500.0}, abs=1e-6)


def test_all_wins_stay_finite_and_the_prior_shrinks_them():
    strong = fit_elo([("a", "b", 1.0)] * 10, prior_games=1.0)
    weak_prior = fit_elo([("a", "b", 1.0)] * 10, prior_games=0.1)
    assert 1000 < strong["a"] < weak_prior["a"] < 2500
    assert strong["a"] - 1000 == pytest.approx(1000 - strong["b"])


def test_fit_elo_rejects_bad_input_with_the_reason():
    with pytest.raises(ValueError, match=r"score 2 of 'a' vs 'b' is not in \[0, 1\]"):
        fit_elo([("a", "b", 2)])
    with pytest.raises(ValueError, match="against itself"):
        fit_elo([("a", "a", 1.0)])
    with pytest.raises(ValueError, match="prior_games must be > 0"):
        fit_elo([], prior_games=0)


def test_member_weights_per_scheme():
    easy, hard = MemberRecord(wins=9), MemberRecord(losses=9)
    assert member_weights([easy, hard], "uniform") == [1.0, 1.0]
    assert member_weights([easy, hard, easy], "latest", latest_share=0.6) == pytest.approx(
        [0.2, 0.2, 0.6])
    pfsp = member_weights([easy, hard], "pfsp", pfsp_power=2.0)
    assert pfsp == pytest.approx([(0.5 / 10) ** 2 + 0.05, (9.5 / 10) ** 2 + 0.05])
    with pytest.raises(ValueError, match="unknown sampling 'elo'"):
        member_weights([easy], "elo")
    with pytest.raises(ValueError, match="the opponent pool is empty"):
        member_weights([], "uniform")


def test_member_record_decays_old_games():
    r = MemberRecord()
    for _ in range(3):
        r.add("loss", decay=0.5)
    r.add("win", decay=0.5)
    assert (r.wins, r.losses) == pytest.approx((1.0, 0.875))  # 1 * .5^2 + .5 ... then * .5
    with pytest.raises(ValueError, match="outcome must be"):
        r.add("tie")


def test_draw_index_is_keyed_and_follows_the_weights():
    weights = [1.0, 3.0]
    assert draw_index("0/17", weights) == draw_index("0/17", weights)  # same key, same draw
    counts = [0, 0]
    for seed in range(4000):
        counts[draw_index(f"0/{seed}", weights)] += 1
    assert 0.7 < counts[1] / 4000 < 0.8
    assert draw_index("x", [0.0, 0.0, 2.0]) == 2
    with pytest.raises(ValueError, match="positive sum"):
        draw_index("x", [0.0])
