"""RL runs on worker groups from YAML alone: 2-process FSDP2 and Archon TP=2 reproduce the
one-process per-step losses; a worker failing in train_step stops the run cleanly."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from areal_agents.cli import main
from areal_agents.errors import TrainError
from areal_agents.trainers.backends import BACKENDS, register_backend
from areal_agents.trainers.checkpointing import latest_checkpoint
from areal_agents.trainers.placement import PARALLELISM
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "signaling"


def _train(yaml: str, run_dir: Path, *overrides: str) -> list[dict[str, float]]:
    assert main(["train", str(EXAMPLES / yaml), f"run_dir={run_dir}", *overrides]) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _policy_metrics(rows: list[dict], key: str) -> list[float]:
    return [row[f"policy/speaker/{key}"] for row in rows if f"policy/speaker/{key}" in row]


def _shards(run_dir: Path) -> list[str]:
    """The DCP shard files of the speaker's last checkpoint (one per rank)."""
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    return sorted(p.name for p in (ckpt / "speaker").glob("__*.distcp"))


@pytest.mark.parametrize("yaml", ["fsdp_2proc.yaml", "archon_tp2.yaml"])
def test_two_process_run_matches_one_process(yaml, tmp_path):
    workers = _train(yaml, tmp_path / "workers")
    single = _train(yaml, tmp_path / "single", "policies.speaker.train={world_size: 1}")
    losses, want = _policy_metrics(workers, "loss"), _policy_metrics(single, "loss")
    assert len(losses) == len(want) == 3
    assert any(abs(v) > 1e-3 for v in want), want  # a real signal, not all-zero advantages
    assert losses == pytest.approx(want, abs=1e-4)
    assert _policy_metrics(workers, "reward") == _policy_metrics(single, "reward")
    assert _policy_metrics(workers, "grad_norm") == pytest.approx(
        _policy_metrics(single, "grad_norm"), rel=1e-3)
    # the speaker really trained on two ranks: each wrote its DCP shard file
    assert _shards(tmp_path / "workers") == ["__0_0.distcp", "__1_0.distcp"]
    assert _shards(tmp_path / "single") == ["__0_0.distcp"]
    assert multiprocessing.active_children() == []  # aclose stopped them


class BoomEngine:
    """FSDP whose rank 1 raises in its second train step (module level: workers unpickle it)."""

    def __new__(cls, *args, **kwargs):
        from areal_agents.trainers.fsdp.engine import FSDPEngine

        class Boom(FSDPEngine):
            def train_step(self, batch, loss_fn):
                if self.rank == 1 and self.step == 1:
                    raise RuntimeError("boom on rank 1")
                return super().train_step(batch, loss_fn)

        return Boom(*args, **kwargs)


async def test_worker_failure_stops_the_run_with_the_checkpoint_intact(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS, "boom", BACKENDS["fsdp"])
    register_backend("boom", BoomEngine)
    monkeypatch.setitem(PARALLELISM, "boom", frozenset({"dp"}))
    sampling = {"temperature": 1.0, "max_tokens": 1}
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "vocab_size": 4, "pool_size": 2},
        policies={"s": Policy(lr=1e-3, sampling=sampling, api="completions", backend="boom",
                              train={"world_size": 2}),
                  "l": Policy(seed=1, frozen=True, sampling=sampling, api="completions")},
        policy_map={"speaker": "s", "listener": "l"}, batch_size=8, group_size=4,
        checkpoint_every=1, run_dir=tmp_path, progress=False, generation_batch_size=1)
    try:
        with pytest.raises(TrainError) as info:
            await trainer.afit(3)
    finally:
        await trainer.aclose()
    message = str(info.value)
    assert message.startswith("engine rank 1 failed:\nTraceback (most recent call last):")
    assert "RuntimeError: boom on rank 1" in message
    assert trainer.step == 1
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step_1"
    assert multiprocessing.active_children() == []
    # the checkpoint is whole: a one-process run resumes from it
    resumed = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "vocab_size": 4, "pool_size": 2},
        policies={"s": Policy(lr=1e-3, sampling=sampling, api="completions"),
                  "l": Policy(seed=1, frozen=True, sampling=sampling, api="completions")},
        policy_map={"speaker": "s", "listener": "l"}, batch_size=8, group_size=4,
        run_dir=tmp_path, resume=True, progress=False, generation_batch_size=1)
    try:
        await resumed.setup()
        assert resumed.step == 1 and resumed.train_engines["s"].step == 1
    finally:
        await resumed.aclose()
