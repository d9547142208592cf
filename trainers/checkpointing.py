"""Trainer checkpoints on disk: files only — the state itself comes from ``state_dict()``s.

Layout of ``run_dir/checkpoints/``::

    step_<n>/                 one complete checkpoint (written as ``step_<n>.partial/`` and
        <policy>/             renamed once every file is in place)
            ...               the policy's ``TrainEngine.save`` (weights, optimizer, LR
                              schedule, engine step and version)
        critics/<policy>/     the policy's learned critic (``CriticEngine.save``: weights,
                              optimizer, step), when ``Policy.critic`` is set
        trainer_state.json    ``Trainer.state_dict()`` (a ``TrainerState``): step, controller
                              state (cursor, versions, outcome ledger), history, trained seeds
                              per step, each policy's algorithm state (EMA baselines)
        rng.pt                python / numpy / torch (and CUDA) RNG states
    reference/<policy>.pt     frozen KL reference weights (``state_dict``), written once
    latest                    name of the newest complete checkpoint, replaced atomically

A run killed at any moment leaves ``latest`` naming a complete checkpoint (or no ``latest``):
a half-written ``step_<n>.partial`` is never read and is removed by the next save.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, runtime_checkable

import torch

from areal_agents.errors import TrainError
from areal_agents.rollout.controller import ControllerState

from .rng import rng_state, set_rng_state

if TYPE_CHECKING:
    from .base import TrainEngine

STATE = "trainer_state.json"
RNG = "rng.pt"


@runtime_checkable
class Stateful(Protocol):
    """An object whose learned state a checkpoint keeps (e.g. an algorithm's EMA baselines)."""

    def state_dict(self) -> Mapping[str, Any]:
        """The state, JSON-serialisable."""
        ...

    def load_state_dict(self, state: Any) -> None:
        """Restore what ``state_dict`` returned."""
        ...


class TrainerState(TypedDict):
    """``Trainer.state_dict()``, stored as ``trainer_state.json``.

    Attributes:
        step: train steps done.
        controller: ``RolloutController.state_dict()``.
        history: the logged metrics of each step.
        trained_seeds: per step, the task seeds of the groups trained.
        algorithms: per trainable policy, its algorithm object's ``state_dict()`` (policies
            sharing one object repeat it).
    """

    step: int
    controller: ControllerState
    history: list[dict[str, float]]
    trained_seeds: list[list[int]]
    algorithms: dict[str, dict[str, Any]]


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when the run has none.

    Raises:
        TrainError: ``latest`` names a directory without a complete checkpoint.
    """
    root = checkpoints_dir(run_dir)
    latest = root / "latest"
    if not latest.exists():
        return None
    ckpt = root / latest.read_text().strip()
    if not (ckpt / STATE).exists():
        raise TrainError(f"{latest} names {ckpt.name}, which has no {STATE}; the checkpoint "
                         "directory was modified by hand: point latest at a complete step_<n>")
    return ckpt


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


async def save_checkpoint(run_dir: str | Path, state: TrainerState,
                          engines: Mapping[str, TrainEngine], *,
                          keep: int | None = None) -> Path:
    """Write ``state``, each engine's ``save`` and the RNG states to
    ``run_dir/checkpoints/step_<state["step"]>``; returns that directory.

    Every file goes to ``step_<n>.partial/`` first; the directory is renamed when complete and
    only then ``latest`` is replaced (atomic rename), so a kill mid-save is harmless. With
    ``keep``, only the newest ``keep`` checkpoints stay.
    """
    root = checkpoints_dir(run_dir)
    final = root / f"step_{state['step']}"
    partial = root / f"step_{state['step']}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    partial.mkdir(parents=True)
    for name, engine in engines.items():
        await asyncio.to_thread(engine.save, str(partial / name))
    (partial / STATE).write_text(json.dumps(state))
    torch.save(rng_state(), partial / RNG)
    if final.exists():  # written by a run killed before it could update `latest`
        shutil.rmtree(final)
    os.replace(partial, final)
    _write_atomic(root / "latest", lambda p: p.write_text(final.name))
    if keep:
        prune_checkpoints(root, keep)
    return final


async def load_checkpoint(ckpt: Path, engines: Mapping[str, TrainEngine]) -> TrainerState:
    """Load each engine's files from checkpoint ``ckpt``; return its ``TrainerState``.

    States written before ``algorithms`` existed (an ``algorithm`` entry holding the shared
    EMA baselines and ``per_policy`` overrides, or the bare EMA dict) are converted, with one
    entry per policy in ``engines``. The RNG states are restored separately
    (``restore_rng``), last.
    """
    state = json.loads((ckpt / STATE).read_text())
    for name, engine in engines.items():
        await asyncio.to_thread(engine.load, str(ckpt / name))
    if "algorithms" not in state:
        state["algorithms"] = _legacy_algorithms(state.pop("algorithm", {}), list(engines))
    return state


def _legacy_algorithms(algo: Any, policies: list[str]) -> dict[str, dict[str, Any]]:
    algo = algo if isinstance(algo, dict) else {}
    if "ema_baselines" in algo or "per_policy" in algo:
        shared, own = algo.get("ema_baselines", {}), algo.get("per_policy", {})
    else:  # the oldest form: the shared EMA dict itself
        shared, own = algo, {}
    return {p: {"ema_baselines": dict(own.get(p, shared))} for p in policies}


def restore_rng(ckpt: Path) -> bool:
    """Restore the RNG states saved in ``ckpt``; False when it has none."""
    if not (ckpt / RNG).exists():
        return False
    set_rng_state(torch.load(ckpt / RNG, weights_only=False))
    return True


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete complete ``step_<n>`` checkpoints but the newest ``keep`` (never the one
    ``latest`` names); returns the deleted directories."""
    latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    doomed = [p for p in steps[:-keep] if p.name != latest] if keep > 0 else []
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def truncate_metrics(path: Path, step: int) -> int:
    """Drop rows of ``metrics.jsonl`` logged after ``step`` (by a run killed after logging
    them but before checkpointing); keeps the file (loggers append to it). Returns rows dropped.
    """
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= step]
    dropped = sum(1 for x in lines if x.strip()) - len(keep)
    if dropped:
        with path.open("r+") as f:
            f.write("".join(keep))
            f.truncate()
    return dropped


def reference_path(run_dir: str | Path, policy: str) -> Path:
    return checkpoints_dir(run_dir) / "reference" / f"{policy}.pt"


def save_reference(run_dir: str | Path, policy: str, model: torch.nn.Module) -> Path:
    """Write a KL reference model's ``state_dict`` once (atomic); returns the file."""
    path = reference_path(run_dir, policy)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _write_atomic(path, lambda p: torch.save(state, p))
    return path


def load_reference(run_dir: str | Path, policy: str, model: torch.nn.Module) -> bool:
    """Load the saved reference of ``policy`` into ``model``; False when none was saved.

    Raises:
        TrainError: the saved weights do not fit ``model`` (names the differing keys).
    """
    path = reference_path(run_dir, policy)
    if not path.exists():
        return False
    result = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise TrainError(f"reference {path} does not fit policy {policy!r}: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}; "
                         "was the policy's model changed? delete the file to re-derive it")
    return True
