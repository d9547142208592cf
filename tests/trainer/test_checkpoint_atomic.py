"""A save that dies while renaming ``step_<n>.partial`` to ``step_<n>`` leaves ``latest``
naming the previous complete checkpoint, and the next save recovers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from areal_agents.trainers import checkpointing
from areal_agents.trainers.checkpointing import latest_checkpoint, save_checkpoint


class FileEngine:
    """The part of a ``TrainEngine`` a checkpoint uses: ``save``/``load`` of one file."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        Path(path, "weights.json").write_text(json.dumps(self.weight))

    def load(self, path: str) -> None:
        self.weight = json.loads(Path(path, "weights.json").read_text())


def state(step: int) -> dict[str, Any]:
    return {"step": step, "controller": {}, "history": [{"step": step}],
            "trained_seeds": [[step]], "algorithms": {}}


async def test_failed_rename_keeps_latest_on_the_previous_step(tmp_path, monkeypatch):
    await save_checkpoint(tmp_path, state(1), {"p": FileEngine(1.0)})
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_1"

    replace = os.replace

    def rename_fails(src: Any, dst: Any) -> None:
        if str(src).endswith(".partial"):
            raise OSError(28, "No space left on device")  # dies before the directory rename
        replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", rename_fails)
    with pytest.raises(OSError, match="No space left"):
        await save_checkpoint(tmp_path, state(2), {"p": FileEngine(2.0)})
    assert (root / "latest").read_text() == "step_1"
    assert latest_checkpoint(tmp_path) == root / "step_1"
    assert (root / "step_2.partial" / "p" / "weights.json").exists()
    assert not (root / "step_2").exists()

    monkeypatch.setattr(checkpointing.os, "replace", replace)
    engine = FileEngine(0.0)
    restored = await checkpointing.load_checkpoint(latest_checkpoint(tmp_path), {"p": engine})
    assert (restored["step"], engine.weight) == (1, 1.0)

    await save_checkpoint(tmp_path, state(2), {"p": FileEngine(2.0)})  # the retry succeeds
    assert latest_checkpoint(tmp_path) == root / "step_2"
    assert not (root / "step_2.partial").exists()
    assert json.loads((root / "step_2" / "trainer_state.json").read_text()) == state(2)
