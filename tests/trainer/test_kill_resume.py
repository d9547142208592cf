"""SIGKILL the training CLI after a checkpoint, resume it, compare with an uninterrupted run.

Two tiny LLMs (speaker, listener) with a format-only warm start (so rewards vary and the
policies move) and a KL penalty (so the frozen references must be restored too);
``max_staleness=0``, fixed seeds (per-turn sampling seeds) and batch-invariant generation
(``generation_batch_size=1``) make the run bitwise deterministic, so the metrics must be equal.
With batched generation two uninterrupted runs already differ: behaviour log-probs by ~1e-7
(CPU kernels round differently per batch shape), which Adam amplifies to ~1e-4 within 5 steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

STEPS = 6
CONFIG = {
    "env": "Signaling-v0",
    "env_kwargs": {"num_items": 2, "pool_size": 2},
    "policies": {
        name: {"model": "tiny:xs", "seed": seed, "lr": 3e-3, "api": "completions",
               "sampling": {"temperature": 1.0, "max_tokens": 1}, "sft_steps": 30}
        for name, seed in (("speaker", 0), ("listener", 1))},
    "policy_map": {"speaker": "speaker", "listener": "listener"},
    "algorithm": {"name": "grpo", "params": {"kl_coef": 0.05}},
    "trainer": {"batch_size": 8, "group_size": 4, "max_staleness": 0, "steps": STEPS,
                "checkpoint_every": 1, "seed": 3, "torch_threads": 1, "generation_batch_size": 1,
                "warm_start": {"episodes": 16, "players": {"speaker": "random",
                                                          "listener": "random"}}},
    "logging": {"tensorboard": False, "progress": False},
}


def launch(config: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "areal_agents.cli", "train", str(config), f"run_dir={run_dir}",
         *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"train failed ({proc.returncode}):\n{out}\n{err[-3000:]}"


def trained_seeds(run_dir: Path) -> list[list[int]]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    return state["trained_seeds"]


def metric_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per step: the deterministic metrics (loss terms, rewards; no timings or counters)."""
    rows: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["step"] < 1:
            continue
        assert row["step"] not in rows, f"step {row['step']} logged twice"
        rows[row["step"]] = {k: v for k, v in row.items() if k.startswith(("policy/", "train/"))
                             and "/time/" not in k and not k.endswith("tokens_per_s")}
    return rows


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = launch(config, straight_dir)
    killed = launch(config, killed_dir)
    latest = killed_dir / "checkpoints" / "latest"
    try:
        while not latest.exists() and killed.poll() is None:
            time.sleep(0.02)
        assert killed.poll() is None, "the run finished before it could be killed"
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL
    at_kill = int(latest.read_text().strip().removeprefix("step_"))
    assert 1 <= at_kill < STEPS
    resumed = launch(config, killed_dir, "resume=true")
    finish(resumed)
    finish(straight)

    # (a) no batch lost or repeated: the same task seeds, step by step
    expected = trained_seeds(straight_dir)
    assert len(expected) == STEPS and all(len(s) == 2 for s in expected)
    assert trained_seeds(killed_dir) == expected
    # (b) the same metrics, step by step (the killed run's rows after its checkpoint are gone)
    want, got = metric_rows(straight_dir), metric_rows(killed_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert any(want[s]["policy/speaker/grad_norm"] > 0 for s in want)  # the policies moved
    assert any(want[s]["policy/speaker/kl"] > 0 for s in want)
    for step in want:
        assert set(got[step]) == set(want[step]), step
        for key, value in want[step].items():
            assert got[step][key] == value, (step, key, got[step][key], value)  # bitwise
    # (c) the outcome ledger adds up: the episodes the kill cut off are cancelled_by_restart
    last = json.loads((killed_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for policy in ("speaker", "listener"):
        prefix = f"outcomes/{policy}/"
        outcomes = sum(v for k, v in last.items() if k.startswith(prefix + "outcome/"))
        unsettled = sum(last[prefix + k] for k in ("running", "waiting", "buffered"))
        assert last[prefix + "submitted"] == outcomes + unsettled, (policy, last)
