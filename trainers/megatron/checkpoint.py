"""MegatronEngine checkpoints with ``torch.distributed.checkpoint`` in the TP-independent layout.

Parameters and the AdamW moments are gathered over the TP group into megatron's *full*
(TP=1) layout and written by DCP (every rank holds the same full tensors, DCP writes each
once), so a checkpoint loads at any TP size: each rank slices its shard on load. Layout of
``path/``: the DCP files, ``trainer_state.pt`` (step, version, scheduler, optimizer
hyper-parameters, TP size; written last by rank 0, its presence marks a complete save) and
``rng_rank{r}.pt`` per rank.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from areal_agents.errors import TrainError
from areal_agents.trainers.megatron.convert import shard

from ..rng import load_rank_rng, save_rank_rng

if TYPE_CHECKING:
    from areal_agents.trainers.megatron.engine import MegatronEngine

TRAINER_STATE = "trainer_state.pt"
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _has_optimizer_state(engine: MegatronEngine) -> bool:
    return any(engine.optimizer.state.get(p) for _, p in engine.named_shards())


def _full_optimizer_state(engine: MegatronEngine) -> dict[str, dict[str, torch.Tensor]]:
    """``{megatron name: {"exp_avg", "exp_avg_sq", "step"}}`` in the full layout (collective)."""
    out = {}
    for name, p in engine.named_shards():
        state = engine.optimizer.state[p]
        entry = {k: engine._gather_full(name, state[k]) for k in _MOMENTS}
        entry["step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).clone()
        out[name] = entry
    return out


def save_checkpoint(engine: MegatronEngine, path: str) -> None:
    """Write ``engine``'s training state to ``path`` (every rank calls it with the same path)."""
    os.makedirs(path, exist_ok=True)
    has_optim = _has_optimizer_state(engine)
    state: dict[str, Any] = {"model": engine.full_state()}
    if has_optim:
        state["optim"] = _full_optimizer_state(engine)
    with warnings.catch_warnings():  # one process: DCP warns it "assumes a single process"
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=path)
    save_rank_rng(path, engine.rank)
    dist.barrier()
    if engine.rank == 0:
        trainer = {
            "step": engine.step, "version": engine.version, "tensor_parallel": engine.tp,
            "scheduler": engine.scheduler.state_dict(), "has_optimizer_state": has_optim,
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in engine.optimizer.param_groups],
        }
        tmp = os.path.join(path, TRAINER_STATE + ".tmp")
        torch.save(trainer, tmp)
        os.replace(tmp, os.path.join(path, TRAINER_STATE))
    dist.barrier()


def load_checkpoint(engine: MegatronEngine, path: str) -> None:
    """Restore a checkpoint written by ``save_checkpoint`` at any TP size.

    Raises:
        TrainError: ``path`` holds no complete checkpoint.
    """
    state_file = os.path.join(path, TRAINER_STATE)
    if not os.path.exists(state_file):
        raise TrainError(
            f"no complete checkpoint at {path!r} ({TRAINER_STATE} missing); was save() interrupted?"
        )
    trainer = torch.load(state_file, weights_only=False)
    model = engine.full_state()
    target: dict[str, Any] = {"model": {n: torch.empty_like(t) for n, t in model.items()}}
    if trainer["has_optimizer_state"]:
        target["optim"] = {n: {"exp_avg": torch.empty_like(t), "exp_avg_sq": torch.empty_like(t),
                               "step": torch.zeros(1)} for n, t in model.items()}
    dcp.load(target, checkpoint_id=path)
    engine.load_full_state(target["model"])
    engine.optimizer.state.clear()
    if trainer["has_optimizer_state"]:
        for name, p in engine.named_shards():
            saved = target["optim"][name]
            engine.optimizer.state[p] = {
                "step": saved["step"].reshape(()).clone(),
                **{k: shard(name, saved[k], engine.tp_rank, engine.tp).clone().to(p.device) for k in _MOMENTS},
            }
    for group, saved_group in zip(engine.optimizer.param_groups, trainer["param_groups"], strict=True):
        group.update(saved_group)
    engine.scheduler.load_state_dict(trainer["scheduler"])
    engine.step = int(trainer["step"])
    engine.version = int(trainer["version"])
    load_rank_rng(path, engine.rank)
    dist.barrier()
