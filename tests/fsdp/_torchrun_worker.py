"""Run under ``torchrun --nproc_per_node 2``: ``launch`` uses the torchrun ranks in place.

Usage: torchrun --nproc_per_node 2 _torchrun_worker.py OUT_JSON
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from _helpers import train_and_export

from areal_agents.trainers.launcher import launch

if __name__ == "__main__":
    torch.set_num_threads(1)
    [(stats, weights, _)] = launch(2, train_and_export, None, 1)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump({"world_size": dist.get_world_size(), "loss": stats[0]["loss"],
                       "num_weights": len(weights)}, fh)
    dist.destroy_process_group()
