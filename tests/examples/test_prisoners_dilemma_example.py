"""examples/prisoners_dilemma/train_league.py: separate parameters per seat, each against its own
snapshots and scripted players, and the league table — at tiny size."""

from __future__ import annotations

import json

from ._load import load_example

train_league = load_example("prisoners_dilemma", "train_league")


def test_format_table_orders_by_elo_and_shows_wdl():
    league = {"players": ["a", "b"], "elo": {"a": 900.0, "b": 1100.0},
              "matrix": {"a": {"b": {"win": 1, "draw": 2, "loss": 3, "games": 6}},
                         "b": {"a": {"win": 3, "draw": 2, "loss": 1, "games": 6}}}}
    assert train_league.format_table(league).splitlines() == [
        "| player | Elo | a | b |", "|---|---|---|---|",
        "| b | 1100 | 3/2/1 |  |", "| a | 900 |  | 1/2/3 |"]


def test_separate_policies_each_meet_their_own_snapshots(tmp_path, capsys):
    run_dir = tmp_path / "pd"
    assert train_league.main(["--steps", "2", "--rounds", "2", "--sft-steps", "2",
                              "--batch-size", "2", "--group-size", "2", "--snapshot-every", "1",
                              "--league-games", "1", "--run-dir", str(run_dir)]) == 0
    league = json.loads((run_dir / "league" / "final.json").read_text())
    # snapshot_every=1: version 0 of each policy, then one snapshot per policy step; under the
    # example's independent clock the 2 steps are a shared budget split by timing (1+1 or 2+0)
    players = league["players"]
    snapshots = [p for p in players[2:] if "@" in p]
    versions = {p: sorted(int(s.split("@")[1]) for s in snapshots if s.startswith(f"{p}@"))
                for p in ("p0", "p1")}
    assert players[:2] == ["p0", "p1"] and players[2:2 + len(snapshots)] == snapshots
    assert all(v == list(range(len(v))) for v in versions.values()) and versions["p0"]
    assert versions["p1"] and len(snapshots) == 2 + 2
    assert players[2 + len(snapshots):] == ["tit_for_tat", "always_defect", "always_cooperate"]
    m = league["matrix"]
    assert m["always_defect"]["always_cooperate"] == {"win": 2.0, "draw": 0.0, "loss": 0.0,
                                                      "games": 2.0}
    assert m["tit_for_tat"]["always_cooperate"]["draw"] == 2.0
    assert "| player | Elo |" in capsys.readouterr().out
    assert (run_dir / "league.png").exists()
