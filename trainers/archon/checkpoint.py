"""Archon training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``path``: DCP shards of ``{"model", "optim"}`` (each rank writes its own shards, so a
sharded engine never gathers full weights), ``meta.pt`` with step, version and scheduler state
(rank 0) and ``rng_<rank>.pt`` with each rank's RNG state.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def _rank(engine) -> int:
    return dist.get_rank() if engine.distributed else 0


def save_checkpoint(engine, path: str) -> None:
    """Save ``engine`` (an ``ArchonEngine``) to directory ``path`` (collective)."""
    os.makedirs(path, exist_ok=True)
    model_sd, optim_sd = get_state_dict(engine.module, engine.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    torch.save(torch.get_rng_state(), os.path.join(path, f"rng_{_rank(engine)}.pt"))
    if _rank(engine) == 0:
        meta = {"step": engine.step, "version": engine.version,
                "scheduler": engine.scheduler.state_dict()}
        torch.save(meta, os.path.join(path, "meta.pt"))
    if engine.distributed:
        dist.barrier()


def load_checkpoint(engine, path: str) -> None:
    """Load a directory written by ``save_checkpoint`` into ``engine`` (collective).

    Raises:
        FileNotFoundError: ``path`` holds no Archon checkpoint.
    """
    meta_file = os.path.join(path, "meta.pt")
    if not os.path.exists(meta_file):
        raise FileNotFoundError(
            f"{path!r} is not an Archon checkpoint (no meta.pt); pass a directory written by "
            "ArchonEngine.save"
        )
    model_sd, optim_sd = get_state_dict(engine.module, engine.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(engine.module, engine.optimizer,
                   model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = torch.load(meta_file, weights_only=False)
    engine.step, engine.version = int(meta["step"]), int(meta["version"])
    engine.scheduler.load_state_dict(meta["scheduler"])
    rng = os.path.join(path, f"rng_{_rank(engine)}.pt")
    if os.path.exists(rng):
        torch.set_rng_state(torch.load(rng, weights_only=True))
