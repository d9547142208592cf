"""2 processes on CPU (gloo): TP=2 and DP=2 equal the single-process run; checkpoints reshard."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_helpers import dp_cases, grpo_batch, grpo_loss, hf_model, make_engine, train_megatron

from areal_agents.trainers.launcher import launch
from areal_agents.trainers.megatron import MegatronEngine

pytestmark = pytest.mark.multiprocess


def _assert_same_run(got, want):
    (stats, weights, logprobs), (ref_stats, ref_weights, ref_logprobs) = got, want
    for a, b in zip(stats, ref_stats, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["entropy"] == pytest.approx(b["entropy"], abs=1e-5)
    _assert_close_weights(weights, ref_weights)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=0)


def _assert_close_weights(weights, ref_weights):
    assert weights.keys() == ref_weights.keys()
    # Adam's first steps divide by sqrt(v) ~ |g|: on gradient elements near 0 the ~1e-9
    # rounding differences of another reduction order become updates up to ~lr (1e-3). A
    # handful of the 0.4M elements differ by up to ~1e-4; a wrong shard would differ by ~lr
    # on most of a tensor, which the mean check catches.
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, atol=2e-4, rtol=0, msg=name)
        assert (weights[name] - w).abs().mean() < 1e-6, name


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_tp2_equals_tp1_and_checkpoint_reshards(tmp_path, family):
    ckpt = str(tmp_path / "tp2")
    rank0, rank1 = launch(2, train_megatron, 2, 2, ckpt, family)
    assert rank1[1] == {}  # only global rank 0 yields exported tensors
    assert rank0[0] == rank1[0]  # identical stats on both TP ranks
    torch.testing.assert_close(rank0[2], rank1[2])
    torch.set_num_threads(1)
    single = train_megatron(1, 2, None, family)
    _assert_same_run(rank0, single)

    # the TP=2 checkpoint loads at TP=1 and continues like the single-process run
    model = hf_model(family)
    batch = grpo_batch(model)
    resumed = MegatronEngine(copy.deepcopy(model), lr=1e-3, token_budget=24)
    resumed.load(ckpt)
    assert resumed.step == 2
    reference = MegatronEngine(copy.deepcopy(model), lr=1e-3, token_budget=24)
    for _ in range(3):
        want = reference.train_step(batch, grpo_loss)
    got = resumed.train_step(batch, grpo_loss)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    _assert_close_weights(dict(resumed.export_weights()), dict(reference.export_weights()))


def test_dp2_equals_single_process():
    rank0, rank1 = launch(2, train_megatron, 1, 2)
    assert rank1[1] == {}
    assert rank0[0] == rank1[0]  # stats are all-reduced over the data-parallel group
    torch.testing.assert_close(rank0[2], rank1[2], atol=0, rtol=0)  # log-probs: shares summed
    torch.set_num_threads(1)
    _assert_same_run(rank0, train_megatron(1, 2))


def test_dp2_with_uneven_and_empty_ranks_equals_single_process():
    from areal_agents.trainers.microbatch import plan_microbatches

    lengths = grpo_batch(hf_model("qwen3"), 5).attention_mask.sum(-1).tolist()
    order = sorted(range(5), key=lambda i: (-lengths[i], i))
    counts = [len(plan_microbatches([lengths[i] for i in order[r::2]], 12)) for r in range(2)]
    assert counts[0] != counts[1]  # the ranks run different numbers of micro-batches
    rank0, rank1 = launch(2, dp_cases)
    torch.set_num_threads(1)
    _assert_same_run(rank0[0], train_megatron(1, 2, None, "qwen3", 5, 12))
    _assert_same_run(rank0[1], train_megatron(1, 1, None, "qwen3", 1))  # rank 1 had no row
    assert rank0[1][0] == rank1[1][0]


@pytest.mark.slow
def test_tp2_dp2_on_four_processes_equals_single_process():
    ranks = launch(4, train_megatron, 2, 2, None, "qwen2")
    assert all(r[0] == ranks[0][0] for r in ranks)  # stats reduced over DP, equal over TP
    assert [len(r[1]) for r in ranks[1:]] == [0, 0, 0]  # only global rank 0 exports
    torch.set_num_threads(1)
    _assert_same_run(ranks[0], train_megatron(1, 2, None, "qwen2"))


def test_distributed_engine_group_drives_a_tp2_engine():
    from areal_agents.trainers.launcher import DistributedEngineGroup

    batch = grpo_batch(hf_model("qwen3"))
    with DistributedEngineGroup(2, make_engine, 2) as group:
        stats = group.train_step(batch, grpo_loss)
        weights = dict(group.export_weights())  # every rank drains its generator
        logprobs = group.forward_logprobs(batch)
    torch.set_num_threads(1)
    _assert_same_run(([stats], weights, logprobs), train_megatron(1, 1))
