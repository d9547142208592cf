"""Trainer checkpoints: engines, data cursor, history, algorithm state, RNG and KL references.

Layout of ``run_dir/checkpoints/``::

    step_<n>/                 one complete checkpoint (written as ``step_<n>.partial/`` and
        <policy>/             renamed once every file is in place)
            ...               the policy's ``TrainEngine.save`` (weights, optimizer, LR
                              schedule, engine step and version)
        trainer_state.json    step, controller state (cursor, versions, counts), history,
                              trained seeds per step, algorithm state (EMA baselines)
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from areal_agents.engines.base import WeightUpdate
from areal_agents.errors import TrainError

from .rng import rng_state, set_rng_state

if TYPE_CHECKING:
    from .trainer import Trainer

STATE = "trainer_state.json"
RNG = "rng.pt"


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


async def save_checkpoint(trainer: Trainer) -> Path:
    """Write ``trainer``'s state to ``run_dir/checkpoints/step_<step>``; returns the directory.

    Every file goes to ``step_<n>.partial/`` first; the directory is renamed when complete and
    only then ``latest`` is replaced (atomic rename), so a kill mid-save is harmless.
    """
    assert trainer.run_dir is not None
    root = checkpoints_dir(trainer.run_dir)
    final = root / f"step_{trainer.step}"
    partial = root / f"step_{trainer.step}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    partial.mkdir(parents=True)
    for name, engine in trainer.train_engines.items():
        await asyncio.to_thread(engine.save, str(partial / name))
    state = {"step": trainer.step, "controller": trainer.controller.state_dict(),
             "history": trainer.history, "trained_seeds": trainer.trained_seeds,
             "algorithm": {"ema_baselines": dict(getattr(trainer.algorithm, "ema_baselines", {})),
                           "per_policy": {n: dict(getattr(a, "ema_baselines", {}))
                                          for n, a in trainer.algorithms.items()
                                          if a is not trainer.algorithm}}}
    (partial / STATE).write_text(json.dumps(state))
    torch.save(rng_state(), partial / RNG)
    if final.exists():  # written by a run killed before it could update `latest`
        shutil.rmtree(final)
    os.replace(partial, final)
    _write_atomic(root / "latest", lambda p: p.write_text(final.name))
    if trainer.keep_checkpoints:
        prune_checkpoints(root, trainer.keep_checkpoints)
    return final


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


async def restore_checkpoint(trainer: Trainer, ckpt: Path) -> None:
    """Load checkpoint ``ckpt`` into a set-up ``trainer``: engines, pushed serving weights,
    versions, controller cursor, history, algorithm state and RNG states (restored last)."""
    state = json.loads((ckpt / STATE).read_text())
    for name, engine in trainer.train_engines.items():
        await asyncio.to_thread(engine.load, str(ckpt / name))
        version = int(state["controller"]["controls"][name]["version"])
        engine.version = version
        update = WeightUpdate(named_tensors=iter(list(engine.export_weights())), version=version)
        await trainer.gateway.update_weights(name, update)
    trainer.controller.load_state_dict(state["controller"])
    trainer.step = int(state["step"])
    trainer.history = list(state.get("history", []))
    trainer.trained_seeds = [list(s) for s in state.get("trained_seeds", [])]
    algo = state.get("algorithm", {})
    if hasattr(trainer.algorithm, "ema_baselines"):
        # older checkpoints stored the EMA dict itself
        trainer.algorithm.ema_baselines = dict(algo.get("ema_baselines", algo)
                                               if isinstance(algo, dict) else {})
    for name, ema in (algo.get("per_policy", {}) if isinstance(algo, dict) else {}).items():
        if name in trainer.algorithms and trainer.algorithms[name] is not trainer.algorithm:
            trainer.algorithms[name].ema_baselines = dict(ema)
    if (ckpt / RNG).exists():
        set_rng_state(torch.load(ckpt / RNG, weights_only=False))
    if trainer.run_dir is not None:
        truncate_metrics(Path(trainer.run_dir) / "metrics.jsonl", trainer.step)


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
