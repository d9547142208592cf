"""Save at step k, SIGKILL the training process, load, and continue exactly like no crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from areal_agents.errors import TrainError

from ._helpers import make_batch, make_engine, ppo_loss

HERE = Path(__file__).parent


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    ckpt, k = str(tmp_path / "step3"), 3
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(HERE / "_kill_worker.py"), ckpt, str(k)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        report = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and report["saved"] == k

    torch.set_num_threads(1)
    resumed = make_engine(token_budget=24, warmup_steps=3)
    resumed.load(ckpt)
    assert (resumed.step, resumed.version) == (k, 7)
    assert torch.rand(3).tolist() == report["rand"]  # RNG state restored
    reference = make_engine(token_budget=24, warmup_steps=3)
    batch = make_batch()
    for _ in range(k):
        reference.train_step(batch, ppo_loss)
    got, want = resumed.train_step(batch, ppo_loss), reference.train_step(batch, ppo_loss)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-7)
    assert got["lr"] == want["lr"] == pytest.approx(1e-3)  # scheduler resumed past warm-up
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6)
    ref_weights = dict(reference.export_weights())
    for name, w in resumed.export_weights():
        torch.testing.assert_close(w, ref_weights[name], atol=1e-7, rtol=1e-6)
    # optimizer moments came back too: a second step still matches
    got2, want2 = resumed.train_step(batch, ppo_loss), reference.train_step(batch, ppo_loss)
    assert got2["loss"] == pytest.approx(want2["loss"], abs=1e-7)


def test_load_without_checkpoint_names_the_problem(tmp_path):
    with pytest.raises(TrainError, match="no complete checkpoint"):
        make_engine().load(str(tmp_path))


def test_lora_engine_round_trips(tmp_path):
    lora = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    engine = make_engine(lora=lora, lr=1e-2)
    batch = make_batch()
    engine.train_step(batch, ppo_loss)
    engine.save(str(tmp_path / "c"))
    other = make_engine(lora=lora, lr=1e-2)
    other.load(str(tmp_path / "c"))
    a = dict(engine.export_weights(merge_lora=False))
    for n, w in other.export_weights(merge_lora=False):
        assert torch.equal(w, a[n])
    assert other.train_step(batch, ppo_loss)["loss"] == pytest.approx(
        engine.train_step(batch, ppo_loss)["loss"], abs=1e-7)
