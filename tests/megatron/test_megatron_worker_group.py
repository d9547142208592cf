"""Megatron TP=2 over two worker processes from YAML reproduces the one-process run (runs in
the Megatron venv, ``.venv-megatron``; skipped elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from areal_agents.cli import main

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

YAML = Path(__file__).resolve().parents[2] / "examples" / "signaling" / "fsdp_2proc.yaml"


def _losses(run_dir: Path, *overrides: str) -> list[dict[str, float]]:
    # the warm start is off: it would build extra in-process Megatron engines in this process
    assert main(["train", str(YAML), f"run_dir={run_dir}", "policies.speaker.backend=megatron",
                 "policies.speaker.sft_steps=0", *overrides]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[f"policy/speaker/{k}"] for k in ("loss", "grad_norm", "reward")}
            for row in rows if "policy/speaker/loss" in row]


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    """Earlier in-process Megatron tests leave a 1-rank gloo group (and Megatron's model-parallel
    state) initialised in this process; the listener's in-process FSDP engine would then shard
    itself as if distributed (DTensor parameters) and its warm start would fail."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def test_megatron_tp2_run_matches_one_process(tmp_path):
    workers = _losses(tmp_path / "workers", "policies.speaker.train={world_size: 2, tp: 2}")
    single = _losses(tmp_path / "single", "policies.speaker.train={world_size: 1}")
    assert len(workers) == len(single) == 3
    assert any(abs(s["loss"]) > 1e-3 for s in single), single  # the entropy bonus at least
    for got, want in zip(workers, single, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3)
        assert got["reward"] == want["reward"]
