"""Nothing large lives in the controller: a worker-group policy's SFT warm start runs on its
ranks (each rank its rows) and its KL reference is built and held there; runs match the
one-process run."""

from __future__ import annotations

import copy
import functools
import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from areal_agents.cli import main
from areal_agents.models import tiny
from areal_agents.samples import collate
from areal_agents.trainers import trainer_setup as trainer_module  # setup builds them
from areal_agents.trainers.checkpointing import reference_path
from areal_agents.trainers.fsdp.engine import FSDPEngine
from areal_agents.trainers.launcher import DistributedEngineGroup
from areal_agents.trainers.placement import TrainPlacement
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.reference import ReferenceSpec
from areal_agents.trainers.row_shards import RowShard
from areal_agents.trainers.warm_start import warm_start_plan, warm_start_policy
from areal_agents.trainers.worker_group import GroupReference, WorkerGroupEngine

pytestmark = [pytest.mark.multiprocess]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "signaling"
TRANSCRIPTS = [[{"role": "user", "content": f"target: {c}"}, {"role": "assistant", "content": d}]
               for c, d in zip("ABCDABCD", "01230123", strict=True)]


def _no_controller_engine(*args, **kwargs):
    raise AssertionError("the controller built an FSDPEngine")


async def test_group_warm_start_runs_on_the_ranks_and_matches_one_process(tmp_path,
                                                                          monkeypatch):
    policy = Policy(sft_steps=3, sft_lr=1e-2, api="completions")
    model, tokenizer = tiny("xs", seed=0)
    single_model, _ = tiny("xs", seed=0)
    # the one-process side runs every row's prompt: the ranks share prompts only among the
    # rows each was dealt, so a side sharing every group would round differently (~1.5e-5
    # here, over the 1e-5 below; sharing itself: tests/fsdp/test_shared_prompts.py)
    plain = functools.partial(FSDPEngine, share_prompts=False)
    want = await warm_start_policy(policy, single_model, tokenizer, plain, TRANSCRIPTS)
    plan = warm_start_plan(policy, tokenizer, TRANSCRIPTS)
    assert plan is not None and len(plan.samples) == 8
    batch = collate(plan.samples, pad_token_id=plan.pad_token_id)
    single_ref = plain(copy.deepcopy(single_model), lr=1e-3)
    want_ref = single_ref.forward_logprobs(batch)
    single_ref.close()

    sent: list[list[RowShard]] = []
    call_each = DistributedEngineGroup.call_each

    def spy(group, method, per_rank):
        if method == "train_step":
            sent.append([args[0] for args, _ in per_rank])
        return call_each(group, method, per_rank)

    monkeypatch.setattr(DistributedEngineGroup, "call_each", spy)
    monkeypatch.setattr(FSDPEngine, "__init__", _no_controller_engine)  # ranks are unpatched
    spec = ReferenceSpec("speaker", None, 0, tmp_path, resumed=False)
    engine = WorkerGroupEngine(model, TrainPlacement(world_size=2), lr=1e-3, warm_start=plan,
                               reference=spec)
    try:
        exported = dict(engine.export_weights())
        assert isinstance(engine.reference, GroupReference)
        ref_logprobs = engine.reference.forward_logprobs(batch)
    finally:
        engine.close()
    assert engine.warm_start_losses == pytest.approx(want, abs=1e-5)
    torch.testing.assert_close(ref_logprobs, want_ref, rtol=0, atol=1e-5)
    assert engine.step == 0  # RL starts on a fresh engine
    # each rank received its share of every SFT step, never the whole batch
    assert len(sent) == 3
    for shards in sent:
        assert all(isinstance(s, RowShard) for s in shards)
        rows = [set(s.rows) - {0} for s in shards]
        assert rows[0].isdisjoint(rows[1])
        assert all(len(s.rows) < len(s.lengths) for s in shards)
        assert rows[0] | rows[1] | {0} == set(range(len(shards[0].lengths)))
    # the ranks trained the weights one process trains (Adam amplifies the two-rank gradient
    # reduction's rounding on near-zero gradients: 2e-5 at most seen here); rank 0 saved them
    trained = single_model.state_dict()
    diffs = {n: float((t - trained[n]).abs().max()) for n, t in exported.items()}
    assert max(diffs.values()) < 1e-4, diffs
    saved = torch.load(reference_path(tmp_path, "speaker"), weights_only=True)
    for name, tensor in exported.items():
        assert torch.equal(saved[name], tensor), name
    assert multiprocessing.active_children() == []


def _train(run_dir: Path, *overrides: str) -> list[dict[str, float]]:
    assert main(["train", str(EXAMPLES / "fsdp_2proc.yaml"), f"run_dir={run_dir}",
                 "algorithm.params={clip_eps: 0.2, entropy_coef: 0.01, kl_coef: 0.1}",
                 *overrides]) == 0
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _speaker(rows: list[dict], key: str) -> list[float]:
    return [row[f"policy/speaker/{key}"] for row in rows if f"policy/speaker/{key}" in row]


@pytest.mark.slow
def test_kl_reference_lives_on_the_ranks_and_matches_one_process(tmp_path, monkeypatch):
    built: list[str] = []  # policies whose reference or warm start ran in the controller
    build_reference, warm_start = trainer_module.build_reference, trainer_module.warm_start_policy

    def spy_reference(name, *args, **kwargs):
        built.append(f"reference:{name}")
        return build_reference(name, *args, **kwargs)

    async def spy_warm_start(policy, *args, **kwargs):
        built.append(f"warm_start:lr={policy.lr}")
        return await warm_start(policy, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_reference", spy_reference)
    monkeypatch.setattr(trainer_module, "warm_start_policy", spy_warm_start)
    workers = _train(tmp_path / "workers")
    assert built == ["warm_start:lr=0.001", "reference:listener"]  # the listener's only
    built.clear()
    single = _train(tmp_path / "single", "policies.speaker.train={world_size: 1}")
    assert sorted(built) == ["reference:listener", "reference:speaker",
                             "warm_start:lr=0.001", "warm_start:lr=0.001"]

    assert _speaker(workers, "loss") == pytest.approx(_speaker(single, "loss"), abs=1e-4)
    assert len(_speaker(workers, "loss")) == 3
    kl = _speaker(single, "kl")
    assert len(kl) == 3 and any(abs(v) > 1e-6 for v in kl[1:]), kl  # the KL really acts
    assert _speaker(workers, "kl") == pytest.approx(kl, abs=1e-4)
    warm = [row for row in workers if "warm_start/speaker/nll_first" in row]
    want = [row for row in single if "warm_start/speaker/nll_first" in row]
    assert warm[0]["warm_start/speaker/nll_last"] == pytest.approx(
        want[0]["warm_start/speaker/nll_last"], abs=1e-4)
    # rank 0 saved the warm-started reference, as the one-process run did (40 Adam steps
    # amplify the two-rank reduction's rounding on near-zero gradients: 3.4e-5 seen here)
    saved = torch.load(reference_path(tmp_path / "workers", "speaker"), weights_only=True)
    expected = torch.load(reference_path(tmp_path / "single", "speaker"), weights_only=True)
    assert saved.keys() == expected.keys()
    diffs = {n: float((t - expected[n]).abs().max()) for n, t in saved.items()}
    assert max(diffs.values()) < 2e-4, diffs
    assert multiprocessing.active_children() == []
