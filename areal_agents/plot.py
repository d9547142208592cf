"""``plot_run``: a PNG of a run's per-agent reward and success over steps and wall time.

Reads ``run_dir/metrics.jsonl`` (one JSON row per logged step). One row of panels per metric
family (``reward``, ``success``), each with a panel over steps and one over wall time; every
panel autoscales its y-axis, since rewards are not always in [0, 1] (TicTacToe loses at -1,
PrisonersDilemma pays up to 25). Needs ``matplotlib`` (``pip install "areal-agents[plot]"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = ("reward", "success")
"""Plotted metric families: keys ``train|eval/<agent>/<family>``."""
ROLLING = 20
"""Train curves are a rolling mean over this many logged steps (per-step batches are noisy)."""


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Rows of ``run_dir/metrics.jsonl`` (empty list when missing)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def family_keys(rows: list[dict[str, float]]) -> dict[str, list[str]]:
    """``{family: sorted keys}`` of the ``train|eval/<agent>/<family>`` metrics in ``rows``
    (families without keys are left out).

    Example:
        >>> family_keys([{"step": 1, "train/x/reward": -1.0, "eval/x/success": 1.0,
        ...               "train/episodes": 8.0}])
        {'reward': ['train/x/reward'], 'success': ['eval/x/success']}
    """
    keys = sorted({k for r in rows for k in r if k.startswith(("train/", "eval/"))})
    found = {f: [k for k in keys if k.count("/") == 2 and k.endswith("/" + f)] for f in FAMILIES}
    return {f: ks for f, ks in found.items() if ks}


def _rolling_mean(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_figure(rows: list[dict[str, float]], title: str = "") -> Any:
    """The matplotlib ``Figure`` of ``rows``: one row of two panels (step, wall time) per family.

    Raises:
        ValueError: no ``train|eval/<agent>/{reward,success}`` metric in ``rows``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = family_keys(rows)
    if not families:
        raise ValueError(f"no train|eval/<agent>/{{{','.join(FAMILIES)}}} metrics to plot")
    fig, axes = plt.subplots(len(families), 2, figsize=(11, 3.6 * len(families)), squeeze=False)
    for (family, keys), (by_step, by_time) in zip(families.items(), axes, strict=True):
        for key in keys:
            pts = [(r["step"], r.get("time", 0.0), r[key]) for r in rows if key in r]
            steps, times, values = (list(v) for v in zip(*pts, strict=True))
            if key.startswith("train/"):
                values = _rolling_mean(values, ROLLING)
            style = "--" if key.startswith("eval/") else "-"
            by_step.plot(steps, values, style, label=key)
            by_time.plot(times, values, style, label=key)
        for ax, xlabel in ((by_step, "step"), (by_time, "wall time (s)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(family)
            ax.grid(alpha=0.3)
            ax.margins(y=0.05)  # autoscaled, with room so curves at the extremes stay visible
        by_step.set_title(f"{family} per agent (train: {ROLLING}-step rolling mean)", fontsize=9)
        by_step.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the plot of ``run_dir``'s metrics to ``out`` (default ``run_dir/plot.png``), and
    with league results (``run_dir/league/``) their heatmap and Elo plot to ``league.png``
    next to it (``areal_agents.league.plot``).

    Raises:
        FileNotFoundError: no metrics in ``run_dir``.
        ValueError: metrics but nothing to plot.
        ModuleNotFoundError: matplotlib is not installed (says which extra to install).
    """
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"no metrics.jsonl rows in {run_dir}; train first")
    from areal_agents.extras import require

    require("matplotlib", "plot", "areal-agents plot")
    import matplotlib.pyplot as plt

    fig = plot_figure(rows, f"{Path(run_dir).name}: reward / success per agent")
    png = Path(out) if out else Path(run_dir) / "plot.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    if (Path(run_dir) / "league").is_dir():  # a run with an opponent pool's league results
        from areal_agents.league.plot import league_files, plot_league

        if league_files(run_dir) or (Path(run_dir) / "league" / "final.json").exists():
            plot_league(run_dir, png.with_name("league.png"))
    return png
