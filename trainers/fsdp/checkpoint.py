"""FSDPEngine checkpoints with ``torch.distributed.checkpoint`` (resharding across world sizes).

Layout of ``path/``: the DCP files (model + optimizer, sharded), ``trainer_state.pt`` (step,
version, scheduler, world size; written by rank 0) and ``rng_rank{r}.pt`` per rank. Loading into
a different world size works: DCP reshards tensors; a rank without its own RNG file takes
rank 0's.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from areal_agents.errors import TrainError

from ..rng import load_rank_rng, save_rank_rng

if TYPE_CHECKING:
    from areal_agents.trainers.fsdp.engine import FSDPEngine

TRAINER_STATE = "trainer_state.pt"


@contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes a single process' without a process group; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(engine: FSDPEngine) -> None:
    if engine.distributed:
        dist.barrier()


def save_checkpoint(engine: FSDPEngine, path: str) -> None:
    """Write ``engine``'s model, optimizer, scheduler, RNG, step and version to ``path``.

    Collective under FSDP (every rank calls it with the same ``path``).
    """
    os.makedirs(path, exist_ok=True)
    model_sd, optim_sd = get_state_dict(engine.module, engine.optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    save_rank_rng(path, engine.rank)
    if engine.rank == 0:
        state = {
            "step": engine.step,
            "version": engine.version,
            "scheduler": engine.scheduler.state_dict(),
            "world_size": engine.world_size,
        }
        tmp = os.path.join(path, TRAINER_STATE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(path, TRAINER_STATE))  # its presence marks a complete save
    _barrier(engine)


def load_checkpoint(engine: FSDPEngine, path: str) -> None:
    """Restore a checkpoint written by ``save_checkpoint`` (any world size) into ``engine``.

    Raises:
        TrainError: ``path`` holds no complete checkpoint.
    """
    state_file = os.path.join(path, TRAINER_STATE)
    if not os.path.exists(state_file):
        raise TrainError(
            f"no complete checkpoint at {path!r} ({TRAINER_STATE} missing); was save() interrupted?"
        )
    model_sd, optim_sd = get_state_dict(engine.module, engine.optimizer)
    state_dict = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(state_dict, checkpoint_id=path)
    set_state_dict(
        engine.module,
        engine.optimizer,
        model_state_dict=state_dict["model"],
        optim_state_dict=state_dict["optim"],
    )
    trainer = torch.load(state_file, weights_only=False)
    engine.step = int(trainer["step"])
    engine.version = int(trainer["version"])
    engine.scheduler.load_state_dict(trainer["scheduler"])
    load_rank_rng(path, engine.rank)
    _barrier(engine)
