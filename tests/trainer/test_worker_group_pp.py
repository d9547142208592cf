"""Archon pipeline parallelism (pp=2) through the Trainer from YAML: per-step losses equal the
one-process run's; layouts the backend cannot run are refused by the placement."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from areal_agents.cli import main
from areal_agents.errors import ConfigError
from areal_agents.models import save_tiny
from areal_agents.trainers.policy import Policy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "signaling"


@pytest.mark.parametrize(("train", "message"), [
    ({"world_size": 4, "pp": 2},
     "Policy.train: archon runs pp only alone (got dp=2, pp=2); supported layouts: dp, ep, tp "
     "combined, or pp alone; set world_size=2 with only pp, or pp=1"),
    ({"world_size": 4, "tp": 2, "pp": 2},
     "Policy.train: archon runs pp only alone (got tp=2, pp=2); supported layouts: dp, ep, tp "
     "combined, or pp alone; set world_size=2 with only pp, or pp=1"),
])
def test_archon_refuses_pipeline_with_other_degrees(train, message):
    with pytest.raises(ConfigError) as info:
        Policy(backend="archon", train=train)
    assert str(info.value) == message


def _speaker(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[f"policy/speaker/{key}"] for row in rows if f"policy/speaker/{key}" in row]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_archon_pp2_run_matches_one_process(tmp_path):
    model = save_tiny(tmp_path / "tiny_xs_untied", tie_word_embeddings=False)
    for name, train in [("workers", "{world_size: 2, pp: 2}"), ("single", "{world_size: 1}")]:
        assert main(["train", str(EXAMPLES / "archon_pp2.yaml"), f"run_dir={tmp_path / name}",
                     f"policies.speaker.model={model}",
                     f"policies.speaker.train={train}"]) == 0
    losses, want = _speaker(tmp_path / "workers", "loss"), _speaker(tmp_path / "single", "loss")
    assert len(losses) == len(want) == 3
    assert any(abs(v) > 1e-3 for v in want), want  # a real signal, not all-zero advantages
    assert losses == pytest.approx(want, abs=1e-4)
    assert _speaker(tmp_path / "workers", "reward") == _speaker(tmp_path / "single", "reward")
    assert multiprocessing.active_children() == []
