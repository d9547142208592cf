"""The trainer's checkpoint side: its JSON state, and saving / restoring a whole run.

``trainer_state_dict`` is everything but the engines' weights a resumed run needs; a checkpoint
directory holds it with each train engine (``<policy>``) and critic (``critics/<policy>``);
``areal_agents.trainers.checkpointing`` draws the layout and says why a crash mid-save is safe.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpointing import (
    Stateful,
    TrainerState,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    truncate_metrics,
)

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["load_trainer_state", "restore_trainer", "save_trainer", "saved_engines",
           "trainer_state_dict"]


def trainer_state_dict(trainer: Trainer) -> TrainerState:
    """``Trainer.state_dict``: step, controller state, history, trained seeds, each policy's
    algorithm state and the league's (JSON-ready)."""
    return {"step": trainer.step, "controller": trainer.controller.state_dict(),
            "history": list(trainer.history),
            "trained_seeds": [list(s) for s in trainer.trained_seeds],
            "algorithms": {p: dict(a.state_dict()) for p, a in trainer.algorithms.items()
                           if isinstance(a, Stateful)},
            "league": trainer.league.state_dict()}


def load_trainer_state(trainer: Trainer, state: TrainerState) -> None:
    """``Trainer.load_state_dict``: restore ``state`` into a set-up trainer; each train engine's
    version becomes its policy's restored version."""
    trainer.step = int(state["step"])
    trainer.history = list(state.get("history", []))
    trainer.trained_seeds = [list(s) for s in state.get("trained_seeds", [])]
    trainer.controller.load_state_dict(state["controller"])
    for name, algo_state in state.get("algorithms", {}).items():
        algorithm = trainer.algorithms.get(name)
        if isinstance(algorithm, Stateful):
            algorithm.load_state_dict(algo_state)
    for name, engine in trainer.train_engines.items():
        engine.version = trainer.controller.controls[name].version


def saved_engines(trainer: Trainer) -> dict[str, Any]:
    """What a checkpoint holds per directory: ``<policy>`` and ``critics/<policy>``."""
    return trainer.train_engines | {f"critics/{p}": c for p, c in trainer.critics.items()}


async def save_trainer(trainer: Trainer) -> Path:
    """``Trainer.save_checkpoint``: engines + state to ``run_dir/checkpoints/step_<n>``."""
    assert trainer.run_dir is not None
    return await save_checkpoint(trainer.run_dir, trainer.state_dict(), saved_engines(trainer),
                                 keep=trainer.keep_checkpoints)


async def restore_trainer(trainer: Trainer, ckpt: Path) -> None:
    """``Trainer.restore_checkpoint``: engines, state, the league's snapshots, the served
    weights, RNG states (last) and ``metrics.jsonl`` cut back to the restored step."""
    state = await load_checkpoint(ckpt, saved_engines(trainer))
    trainer.load_state_dict(state)
    await trainer.league.restore(trainer, state.get("league", {}))  # re-serve pool snapshots
    for name, engine in trainer.train_engines.items():
        update = await trainer.weight_pushes[name].update(engine, engine.version)
        await trainer.gateway.update_weights(name, update)
    restore_rng(ckpt)
    if trainer.run_dir is not None:
        truncate_metrics(trainer.run_dir / "metrics.jsonl", trainer.step)
