"""``plot_league``: the league's win/draw/loss matrix as a heatmap, and Elo over training.

Reads the league files a run writes (``run_dir/league/step_<n>.json``, and ``final.json`` if
present, see ``areal_agents.trainers.league``): the matrix of the last one (a cell is the row
player's score against the column player, win 1, draw 0.5, annotated ``W/D/L``), and each
player's Elo at every league step. Needs ``matplotlib``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["league_files", "plot_league"]


def league_files(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of ``run_dir/league/step_<n>.json``, by step (empty when none)."""
    root = Path(run_dir) / "league"
    found = [(int(m.group(1)), p) for p in root.glob("step_*.json")
             if (m := re.fullmatch(r"step_(\d+)\.json", p.name))]
    return sorted(found)


def _score_matrix(league: dict[str, Any]) -> tuple[list[str], list[list[float]], list[list[str]]]:
    players = league["players"]
    scores, labels = [], []
    for a in players:
        row, text = [], []
        for b in players:
            cell = league["matrix"].get(a, {}).get(b)
            if a == b or not cell or not cell["games"]:
                row.append(float("nan"))
                text.append("")
                continue
            row.append((cell["win"] + 0.5 * cell["draw"]) / cell["games"])
            text.append(f"{cell['win']:.0f}/{cell['draw']:.0f}/{cell['loss']:.0f}")
        scores.append(row)
        labels.append(text)
    return players, scores, labels


def plot_league(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the league plot of ``run_dir`` to ``out`` (default ``run_dir/league.png``).

    Raises:
        FileNotFoundError: the run has no league files.
    """
    steps = league_files(run_dir)
    final = Path(run_dir) / "league" / "final.json"
    if not steps and not final.exists():
        raise FileNotFoundError(f"no league results in {Path(run_dir) / 'league'}; set "
                                "OpponentPool(league_every=k) with eval_every")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = json.loads((final if final.exists() else steps[-1][1]).read_text())
    players, scores, labels = _score_matrix(last)
    fig, (heat, elo) = plt.subplots(1, 2, figsize=(6 + 0.9 * len(players), 0.6 * len(players) + 3))
    image = heat.imshow(scores, cmap="RdYlGn", vmin=0.0, vmax=1.0)
    heat.set_xticks(range(len(players)), players, rotation=45, ha="right", fontsize=8)
    heat.set_yticks(range(len(players)), players, fontsize=8)
    for i, row in enumerate(labels):
        for j, text in enumerate(row):
            heat.text(j, i, text, ha="center", va="center", fontsize=6)
    heat.set_title(f"league (step {last.get('step', 'final')}): row's score vs column\n"
                   "cells: W/D/L over both seats", fontsize=9)
    fig.colorbar(image, ax=heat, fraction=0.046)
    history = [(s, json.loads(p.read_text())["elo"]) for s, p in steps]
    for player in dict.fromkeys(p for _, e in history for p in e):
        pts = [(s, e[player]) for s, e in history if player in e]
        elo.plot([s for s, _ in pts], [r for _, r in pts], "o-", label=player, markersize=3)
    elo.set_xlabel("step")
    elo.set_ylabel("Elo")
    elo.set_title("Elo at each league evaluation", fontsize=9)
    elo.grid(alpha=0.3)
    if history:
        elo.legend(fontsize=7)
    fig.tight_layout()
    png = Path(out) if out else Path(run_dir) / "league.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
