"""Process RNG states (python, numpy, torch, CUDA) for checkpoints: one copy for every backend."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The process's python, numpy and torch (and CUDA, when available) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states returned by ``rng_state()`` (CUDA only when present and available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_rng(path: str, rank: int) -> None:
    """Write this rank's ``rng_state()`` to ``path/rng_rank<rank>.pt``."""
    torch.save(rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))


def load_rank_rng(path: str, rank: int) -> None:
    """Restore ``path/rng_rank<rank>.pt``, or rank 0's file when the checkpoint was written by a
    smaller world (ranks that did not exist then start from rank 0's state)."""
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.exists(rng_file):
        rng_file = os.path.join(path, "rng_rank0.pt")
    set_rng_state(torch.load(rng_file, weights_only=False))
