"""2-process FSDP2 on CPU (gloo) matches a single-process run; 2 -> 1 world-size checkpoint load."""

from __future__ import annotations

import pytest
import torch

from areal_agents.errors import TrainError
from areal_agents.trainers.launcher import DistributedEngineGroup, free_port, launch

from ._helpers import (
    make_batch,
    make_engine,
    nan_loss,
    ppo_loss,
    rank_and_world,
    train_and_export,
    train_lora_and_export,
    train_many_groups,
    train_uneven,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_two_process_fsdp_matches_single_process(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    results = launch(2, train_and_export, ckpt, 2)
    (stats0, weights0, lp0), (stats1, weights1, lp1) = results
    assert weights1 == {}  # only rank 0 yields exported tensors
    torch.testing.assert_close(lp0, lp1)

    torch.set_num_threads(1)
    single_stats, single_weights, single_lp = train_and_export(None, 2)
    for got, want in zip(stats0, single_stats, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["entropy"] == pytest.approx(want["entropy"], abs=1e-5)
    assert stats0 == stats1  # stats are all-reduced: identical on every rank
    assert weights0.keys() == single_weights.keys()
    for name, w in single_weights.items():
        torch.testing.assert_close(weights0[name], w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp0, single_lp, atol=1e-5, rtol=1e-5)

    # the 2-process checkpoint loads into one process and continues like the single run
    resumed = make_engine(token_budget=24)
    resumed.load(ckpt)
    assert resumed.step == 2
    for name, w in resumed.export_weights():
        torch.testing.assert_close(w, single_weights[name], atol=1e-5, rtol=1e-5)
    reference = make_engine(token_budget=24)
    batch = make_batch()
    for _ in range(2):
        reference.train_step(batch, ppo_loss)
    got, want = resumed.train_step(batch, ppo_loss), reference.train_step(batch, ppo_loss)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    ref_weights = dict(reference.export_weights())
    for name, w in resumed.export_weights():
        torch.testing.assert_close(w, ref_weights[name], atol=1e-5, rtol=1e-5)


def test_engine_group_proxies_methods_to_all_ranks():
    with DistributedEngineGroup(2, make_engine, token_budget=24) as group:
        batch = make_batch()
        before = group.call("forward_logprobs", batch)
        torch.testing.assert_close(before[0], before[1])
        stats = group.call("train_step", batch, ppo_loss)
        assert stats[0] == stats[1] and stats[0]["loss"] != 0.0
        assert group.call("step") == [1, 1]
        with pytest.raises(TrainError, match=r"rank 0 failed:(.|\n)*non-finite loss"):
            group.train_step(batch, nan_loss)
        assert group.call("step") == [1, 1]  # workers survive a failed call
        exported = group.call("export_weights")
        assert exported[1] == [] and len(exported[0]) > 0
    single = make_engine(token_budget=24)
    assert single.train_step(batch, ppo_loss)["loss"] == pytest.approx(stats[0]["loss"], abs=1e-6)


HEAD_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]}


@pytest.mark.parametrize("lora, tie", [(None, True), (HEAD_LORA, False)], ids=["qv", "lm_head"])
def test_two_process_lora_matches_single_process(lora, tie):
    (losses, merged, adapter), (_, merged1, adapter1) = launch(2, train_lora_and_export, 2,
                                                               lora, tie)
    assert merged1 == {} and adapter1 == {}
    torch.set_num_threads(1)
    want_losses, want_merged, want_adapter = train_lora_and_export(2, lora, tie)
    if lora is HEAD_LORA:  # the head adapter trains under FSDP2 too
        assert torch.count_nonzero(adapter["base_model.model.lm_head.lora_B.weight"]) > 0
    assert losses == pytest.approx(want_losses, abs=1e-6)
    assert merged.keys() == want_merged.keys() and adapter.keys() == want_adapter.keys()
    for name, w in want_merged.items():
        torch.testing.assert_close(merged[name], w, atol=1e-5, rtol=1e-5)
    for name, w in want_adapter.items():
        torch.testing.assert_close(adapter[name], w, atol=1e-5, rtol=1e-5)


def test_launch_under_torchrun_uses_its_ranks(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                    str(here / "_torchrun_worker.py"), str(out)],
                   env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    torch.set_num_threads(1)
    (single, weights, _) = train_and_export(None, 1)
    assert report["world_size"] == 2 and report["num_weights"] == len(weights)
    assert report["loss"] == pytest.approx(single[0]["loss"], abs=1e-6)


def test_launch_reports_ranks_threads_and_worker_errors():
    assert launch(2, rank_and_world) == [(0, 2, 1), (1, 2, 1)]
    with pytest.raises(TrainError, match=r"rank 1 failed:(.|\n)*boom on rank 1"):
        launch(2, rank_and_world, 1)


def test_uneven_microbatch_counts_across_ranks_match_single_process():
    (stats, weights), (stats1, _) = launch(2, train_uneven)
    torch.set_num_threads(1)
    want_stats, want_weights = train_uneven()
    assert stats == stats1
    assert stats["loss"] == pytest.approx(want_stats["loss"], abs=1e-6)
    assert stats["entropy"] == pytest.approx(want_stats["entropy"], abs=1e-5)
    for name, w in want_weights.items():
        torch.testing.assert_close(weights[name], w, atol=1e-5, rtol=1e-5)


def test_two_process_shared_prompts_match_one_process_without():
    """FSDP2 runs each sharded layer twice per forward (prompt pass, then remainder pass on
    its cache) and re-gathers it in backward once per call: 2 ranks sharing prompts over
    several micro-batches give the updates of one process that does not share."""
    (s0, w0, lp0, on0, saved0), (s1, _, lp1, on1, saved1) = launch(2, train_many_groups, 2)
    assert on0 and on1 and saved0 > 0 and saved1 > 0
    torch.set_num_threads(1)
    single, weights, logprobs, on, saved = train_many_groups(2, share_prompts=False)
    assert not on and saved == 0
    for got, want in zip(s0, single, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert s0 == s1  # every stat summed over the ranks, the saved prompt tokens too
    # each rank: its share of 2 train steps, then forward_logprobs on the whole batch, which
    # saves what one process saves (each of the 10 prompts once instead of 4 times); a train
    # step saves less, since rows reach the ranks by length and a group's rows are split
    whole = 3 * sum(6 + p % 8 for p in range(10))
    assert saved0 + saved1 == 2 * whole + 2 * s0[0]["shared_prompt_tokens"]
    assert 0 < s0[0]["shared_prompt_tokens"] < whole
    for name, w in weights.items():
        torch.testing.assert_close(w0[name], w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp0, logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp0, lp1)
