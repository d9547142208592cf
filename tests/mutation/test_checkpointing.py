"""Checkpoint files without a trainer: layout, stale partial/final directories, pruning
(numeric order, never ``latest``), ``latest`` errors, legacy algorithm state, RNG, metrics
truncation and KL reference files."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from areal_agents.errors import TrainError
from areal_agents.trainers.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    load_reference,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    save_reference,
    truncate_metrics,
)


class FileEngine:
    """``save``/``load`` of one JSON file, as a ``TrainEngine`` would write its directory."""

    def __init__(self, weight: float = 0.0) -> None:
        self.weight = weight

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        Path(path, "weights.json").write_text(json.dumps(self.weight))

    def load(self, path: str) -> None:
        self.weight = json.loads(Path(path, "weights.json").read_text())


def state(step: int, **extra: Any) -> dict[str, Any]:
    return {"step": step, "controller": {"cursor": step}, "history": [], "trained_seeds": [],
            "algorithms": {"p": {"ema_baselines": {"task": 0.5}}}, **extra}


async def test_layout_and_stale_directories(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_3.partial").mkdir(parents=True)
    (root / "step_3.partial" / "junk").write_text("from a killed save")
    (root / "step_3").mkdir()
    (root / "step_3" / "junk").write_text("renamed, but latest was never written")
    (root / "latest.tmp").write_text("step_2")  # killed while replacing latest
    out = await save_checkpoint(tmp_path, state(3), {"p": FileEngine(1.5), "q": FileEngine(2)})
    assert out == root / "step_3"
    assert sorted(p.name for p in out.iterdir()) == ["p", "q", "rng.pt", "trainer_state.json"]
    assert json.loads((out / "trainer_state.json").read_text()) == state(3)
    assert (root / "latest").read_text() == "step_3"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_3"]
    assert not (root / "latest.tmp").exists()


async def test_load_restores_engines_and_returns_the_state(tmp_path):
    await save_checkpoint(tmp_path, state(2), {"p": FileEngine(4.0)})
    engine = FileEngine()
    loaded = await load_checkpoint(tmp_path / "checkpoints" / "step_2", {"p": engine})
    assert loaded == state(2) and engine.weight == 4.0


@pytest.mark.parametrize(("algorithm", "expected"), [
    ({"ema_baselines": {"k": 0.5}, "per_policy": {"b": {"k": 0.9}}},
     {"a": {"ema_baselines": {"k": 0.5}}, "b": {"ema_baselines": {"k": 0.9}}}),
    ({"ema_baselines": {"k": 0.5}},
     {"a": {"ema_baselines": {"k": 0.5}}, "b": {"ema_baselines": {"k": 0.5}}}),
    ({"per_policy": {"b": {"k": 0.9}}},
     {"a": {"ema_baselines": {}}, "b": {"ema_baselines": {"k": 0.9}}}),
    ({"k": 0.25}, {"a": {"ema_baselines": {"k": 0.25}}, "b": {"ema_baselines": {"k": 0.25}}}),
    ("not a dict", {"a": {"ema_baselines": {}}, "b": {"ema_baselines": {}}}),
    (None, {"a": {"ema_baselines": {}}, "b": {"ema_baselines": {}}}),
])
async def test_legacy_algorithm_state_is_converted(tmp_path, algorithm, expected):
    old = state(1)
    del old["algorithms"]
    if algorithm is not None:
        old["algorithm"] = algorithm
    engines = {"a": FileEngine(), "b": FileEngine()}
    await save_checkpoint(tmp_path, old, engines)
    loaded = await load_checkpoint(tmp_path / "checkpoints" / "step_1", engines)
    assert loaded["algorithms"] == expected
    assert "algorithm" not in loaded


async def test_keep_prunes_older_checkpoints(tmp_path):
    for step in range(1, 5):
        await save_checkpoint(tmp_path, state(step), {"p": FileEngine(step)}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_3", "step_4"]
    await save_checkpoint(tmp_path, state(5), {"p": FileEngine()}, keep=None)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_3", "step_4", "step_5"]


def make_steps(root: Path, *steps: int) -> None:
    for step in steps:
        (root / f"step_{step}").mkdir(parents=True)


def test_prune_orders_steps_numerically_and_spares_latest(tmp_path):
    make_steps(tmp_path, 2, 9, 10, 11)
    (tmp_path / "latest").write_text("step_2\n")
    (tmp_path / "step_12.partial").mkdir()
    (tmp_path / "step_x").mkdir()
    (tmp_path / "step_13").write_text("a file, not a checkpoint")
    doomed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in doomed) == ["step_9"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_10", "step_11", "step_12.partial", "step_13", "step_2", "step_x"]


def test_prune_without_latest_and_with_keep_zero(tmp_path):
    make_steps(tmp_path, 1, 2, 3)
    assert prune_checkpoints(tmp_path, 0) == []
    assert prune_checkpoints(tmp_path, -1) == []  # keep <= 0: nothing is deleted
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["step_1", "step_2"]
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_3"]


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    root = tmp_path / "checkpoints"
    make_steps(root, 4)
    (root / "latest").write_text("step_4\n")
    with pytest.raises(TrainError) as info:
        latest_checkpoint(tmp_path)
    assert str(info.value) == (
        f"{root / 'latest'} names step_4, which has no trainer_state.json; the checkpoint "
        "directory was modified by hand: point latest at a complete step_<n>")
    (root / "step_4" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == root / "step_4"


async def test_restore_rng(tmp_path):
    assert restore_rng(tmp_path) is False
    random.seed(1)
    torch.manual_seed(1)
    out = await save_checkpoint(tmp_path, state(1), {})
    expected = (random.random(), torch.rand(2).tolist())
    random.seed(2)
    torch.manual_seed(2)
    assert restore_rng(out) is True
    assert (random.random(), torch.rand(2).tolist()) == expected


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert truncate_metrics(path, 3) == 0 and not path.exists()
    path.write_text('{"note": "no step"}\n{"step": 1}\n')
    assert truncate_metrics(path, 0) == 1  # a row without a step counts as step 0
    assert path.read_text() == '{"note": "no step"}\n'
    rows = [{"step": 0}, {"step": 1}, {"note": "no step"}, {"step": 2}, {"step": 3}, {"step": 4}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + "\n"
    path.write_text(text)
    assert truncate_metrics(path, 4) == 0
    assert path.read_text() == text  # untouched when nothing is dropped
    assert truncate_metrics(path, 2) == 2
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:4]


def test_reference_round_trip_and_mismatch(tmp_path):
    assert load_reference(tmp_path, "p", torch.nn.Linear(2, 2)) is False
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3)
    path = save_reference(tmp_path, "p", model)
    assert path == tmp_path / "checkpoints" / "reference" / "p.pt"
    assert not path.with_name("p.pt.tmp").exists()
    other = torch.nn.Linear(2, 3)
    assert load_reference(tmp_path, "p", other) is True
    torch.testing.assert_close(other.weight, model.weight)
    with pytest.raises(TrainError) as info:
        load_reference(tmp_path, "p", torch.nn.Sequential(torch.nn.Linear(2, 3)))
    assert str(info.value) == (
        f"reference {path} does not fit policy 'p': missing ['0.weight', '0.bias'], "
        "unexpected ['weight', 'bias']; was the policy's model changed? delete the file to "
        "re-derive it")


def test_references_of_several_policies_and_a_second_save(tmp_path):
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    save_reference(tmp_path, "a", a)
    save_reference(tmp_path, "b", b)
    save_reference(tmp_path, "a", b)  # rewritten (a re-derived reference)
    loaded = torch.nn.Linear(2, 2)
    assert load_reference(tmp_path, "a", loaded)
    torch.testing.assert_close(loaded.weight, b.weight)


def test_reference_with_only_missing_keys_or_many_keys_is_rejected(tmp_path):
    save_reference(tmp_path, "p", torch.nn.Linear(2, 2))
    wider = torch.nn.Linear(2, 2)
    wider.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(TrainError, match=r"missing \['extra'\], unexpected \[\];"):
        load_reference(tmp_path, "p", wider)
    save_reference(tmp_path, "deep", torch.nn.Sequential(*(torch.nn.Linear(1, 1)
                                                            for _ in range(4))))
    flat = torch.nn.ModuleDict({f"m{i}": torch.nn.Linear(1, 1) for i in range(4)})
    with pytest.raises(TrainError) as info:
        load_reference(tmp_path, "deep", flat)
    assert ("missing ['m0.weight', 'm0.bias', 'm1.weight', 'm1.bias', 'm2.weight'], unexpected "
            "['0.weight', '0.bias', '1.weight', '1.bias', '2.weight'];") in str(info.value)


class NotATensor:
    """Anything but tensors in a reference file must not be unpickled."""


def test_reference_files_load_weights_only(tmp_path):
    path = save_reference(tmp_path, "p", torch.nn.Linear(2, 2))
    torch.save({"weight": NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"Weights only load failed"):
        load_reference(tmp_path, "p", torch.nn.Linear(2, 2))
