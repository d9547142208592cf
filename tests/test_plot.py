"""``areal-agents plot``: autoscaled panels (rewards beyond [0, 1]), one row per metric family."""

from __future__ import annotations

import pytest

from areal_agents import cli
from areal_agents.metrics import JSONLLogger
from areal_agents.plot import family_keys, plot_figure, read_metrics

pytest.importorskip("matplotlib")


def _write(run_dir, steps: int = 30) -> None:
    logger = JSONLLogger(run_dir / "metrics.jsonl")
    for step in range(1, steps + 1):
        frac = (step - 1) / (steps - 1)
        logger.log(step, {"train/x/reward": -1.0 + 2 * frac,  # TicTacToe: -1 .. 1
                          "train/row/reward": 25.0 * frac,  # PrisonersDilemma: 0 .. 25
                          "train/x/success": frac, "train/episodes": 8.0})
        if step % 10 == 0:
            logger.log(step, {"eval/x/reward": -1.0, "eval/row/reward": 25.0})
    logger.close()


def _panels(fig):
    return [ax for ax in fig.axes if ax.lines]


def test_axes_contain_the_data_one_family_per_panel(tmp_path):
    _write(tmp_path)
    rows = read_metrics(tmp_path)
    assert family_keys(rows) == {
        "reward": ["eval/row/reward", "eval/x/reward", "train/row/reward", "train/x/reward"],
        "success": ["train/x/success"]}
    fig = plot_figure(rows)
    panels = _panels(fig)
    assert len(panels) == 4  # (reward, success) x (step, wall time)
    families = []
    for ax in panels:
        labels = {line.get_label() for line in ax.lines}
        family = {label.rsplit("/", 1)[1] for label in labels}
        assert len(family) == 1  # never two families on one axis
        families.append(family.pop())
        assert ax.get_ylabel() == families[-1]
        assert ax.get_xlabel() in ("step", "wall time (s)")
        low, high = ax.get_ylim()
        ys = [y for line in ax.lines for y in line.get_ydata()]
        assert low < min(ys) and max(ys) < high  # nothing clipped at the edges
    assert families == ["reward", "reward", "success", "success"]
    reward_ylim = panels[0].get_ylim()
    assert reward_ylim[0] < -1.0 and reward_ylim[1] > 25.0 * 0.5  # rolling mean of 0..25
    assert panels[2].get_ylim()[1] < 2.0  # success keeps its own scale


def test_nothing_to_plot_is_a_clear_error(tmp_path, capsys):
    JSONLLogger(tmp_path / "metrics.jsonl").log(1, {"train/episodes": 8.0})
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert "no train|eval/<agent>/{reward,success} metrics to plot" in capsys.readouterr().err


def test_cli_plot_writes_png(tmp_path, capsys):
    _write(tmp_path)
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
