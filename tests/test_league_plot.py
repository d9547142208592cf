"""``areal-agents plot`` draws a run's league: the W/D/L heatmap and Elo over steps."""

from __future__ import annotations

import json

import pytest

from areal_agents.cli import main
from areal_agents.league.plot import _score_matrix, league_files, plot_league

pytest.importorskip("matplotlib")


def write_league(run_dir, step, elo):
    players = list(elo)
    cell = {"win": 3.0, "draw": 1.0, "loss": 0.0, "games": 4.0}
    back = {"win": 0.0, "draw": 1.0, "loss": 3.0, "games": 4.0}
    matrix = {a: {b: (cell if i < j else back) for j, b in enumerate(players) if b != a}
              for i, a in enumerate(players)}
    path = run_dir / "league" / f"step_{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"players": players, "matrix": matrix, "elo": elo,
                                "step": step}))


def test_score_matrix_reads_the_row_players_score():
    league = {"players": ["a", "b"], "matrix": {
        "a": {"b": {"win": 3, "draw": 1, "loss": 0, "games": 4}},
        "b": {"a": {"win": 0, "draw": 1, "loss": 3, "games": 4}}}}
    players, scores, labels = _score_matrix(league)
    assert players == ["a", "b"] and scores[0][1] == 0.875 and scores[1][0] == 0.125
    assert labels[0][1] == "3/1/0" and labels[0][0] == ""


def test_plot_run_writes_the_league_png_next_to_the_metrics_plot(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "time": float(s), "train/x/reward": 0.1 * s,
                              "league/p/elo": 1000.0 + s}) for s in (1, 2)) + "\n")
    write_league(tmp_path, 10, {"p": 1100.0, "heuristic": 900.0})
    write_league(tmp_path, 2, {"p": 1000.0, "heuristic": 1000.0})
    assert [s for s, _ in league_files(tmp_path)] == [2, 10]
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "plot.png")
    png = tmp_path / "league.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_league_without_results_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"set OpponentPool\(league_every=k\)"):
        plot_league(tmp_path)
