"""Subprocess for the SIGKILL test: train k steps, save, report, keep training until killed.

Usage: python _kill_worker.py CKPT_DIR K
"""

from __future__ import annotations

import json
import sys

import torch
from _helpers import make_batch, make_engine, ppo_loss

if __name__ == "__main__":
    torch.set_num_threads(1)
    ckpt, k = sys.argv[1], int(sys.argv[2])
    engine = make_engine(token_budget=24, warmup_steps=3)
    batch = make_batch()
    for _ in range(k):
        engine.train_step(batch, ppo_loss)
    engine.version = 7
    torch.manual_seed(1234)
    engine.save(ckpt)
    after_save = torch.rand(3).tolist()  # what the restored RNG must produce next
    print(json.dumps({"saved": k, "rand": after_save}), flush=True)
    while True:  # busy training when the parent kills us
        engine.train_step(batch, ppo_loss)
