"""A one-rank worker group trains the plain module, as in one process: same losses and weights
bit for bit, no FSDP2 at world size 1, and its checkpoints (and those an FSDP2-wrapped one-rank
engine wrote before) load on either side."""

from __future__ import annotations

import os

import pytest
import torch
from fsdp._helpers import make_batch, make_model, ppo_loss
from torch.distributed.tensor import DTensor

from areal_agents.trainers.fsdp.engine import FSDPEngine, full_tensor
from areal_agents.trainers.launcher import launch
from areal_agents.trainers.placement import TrainPlacement
from areal_agents.trainers.worker_group import WorkerGroupEngine

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _probe_one_rank() -> tuple[bool, int, int]:
    """Worker of a 1-rank process group: (distributed, DTensor params, params)."""
    engine = FSDPEngine(make_model(), lr=1e-3)
    params = list(engine.module.parameters())
    return engine.distributed, sum(isinstance(p, DTensor) for p in params), len(params)


def _save_fsdp2_wrapped(path: str) -> dict[str, torch.Tensor]:
    """Worker of a 1-rank process group: what ``FSDPEngine`` did there before (FSDP2
    ``fully_shard`` at world size 1, optimizer over the DTensors): one step, then save; returns
    the saved weights (full tensors)."""
    engine = FSDPEngine(make_model(), lr=1e-3, token_budget=24)
    engine.distributed = True
    engine._shard()
    params = [p for p in engine.module.parameters() if p.requires_grad]
    engine.optimizer = torch.optim.AdamW(params, lr=1e-3)
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda _: 1.0)
    assert all(isinstance(p, DTensor) for p in params)
    engine.train_step(make_batch(), ppo_loss)
    engine.version = 3
    engine.save(path)
    return {n: full_tensor(p.detach()).clone() for n, p in engine.module.base.named_parameters()}


def test_a_one_rank_process_group_trains_the_plain_module():
    distributed, sharded, total = launch(1, _probe_one_rank)[0]
    assert (distributed, sharded) == (False, 0) and total > 0


def test_one_rank_worker_group_trains_bit_for_bit_like_one_process(tmp_path):
    torch.set_num_threads(1)
    batches = [make_batch(seed=s, num=7) for s in (1, 2, 3)]
    engine = WorkerGroupEngine(make_model(), TrainPlacement(world_size=1), lr=1e-3,
                               token_budget=24)
    try:
        got = [engine.train_step(b, ppo_loss) for b in batches]
        weights = dict(engine.export_weights())
        logprobs = engine.forward_logprobs(batches[0])
        engine.version = 4
        engine.save(str(tmp_path / "worker"))
    finally:
        engine.close()
    single = FSDPEngine(make_model(), lr=1e-3, token_budget=24)
    want = [single.train_step(b, ppo_loss) for b in batches]
    assert [g["loss"] for g in got] == [w["loss"] for w in want]
    assert [g["grad_norm"] for g in got] == [w["grad_norm"] for w in want]
    want_weights = dict(single.export_weights())
    assert weights.keys() == want_weights.keys()
    for name, w in want_weights.items():
        assert torch.equal(weights[name], w), name
    assert torch.equal(logprobs, single.forward_logprobs(batches[0]))

    # the worker's checkpoint resumes in one process: same weights, step, version, next step
    resumed = FSDPEngine(make_model(seed=5), lr=1e-3, token_budget=24)
    resumed.load(str(tmp_path / "worker"))
    assert (resumed.step, resumed.version) == (3, 4)
    for name, t in resumed.export_weights():
        assert torch.equal(t, want_weights[name]), name
    nxt = make_batch(seed=9, num=7)
    assert resumed.train_step(nxt, ppo_loss)["loss"] == single.train_step(nxt, ppo_loss)["loss"]


def test_a_checkpoint_of_the_fsdp2_wrapped_one_rank_engine_still_loads(tmp_path):
    path = str(tmp_path / "old")
    saved = launch(1, _save_fsdp2_wrapped, path)[0]
    plain = FSDPEngine(make_model(seed=7), lr=1e-3, token_budget=24)
    plain.load(path)
    assert (plain.step, plain.version) == (1, 3)
    for name, p in plain.module.base.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
    engine = WorkerGroupEngine(make_model(seed=7), TrainPlacement(world_size=1), lr=1e-3,
                               token_budget=24)
    try:
        engine.load(path)
        assert (engine.step, engine.version) == (1, 3)
        got = dict(engine.export_weights())
        for name, t in plain.export_weights():
            assert torch.equal(got[name], t), name
        batch = make_batch(seed=4)  # optimizer state restored alike on both sides
        assert engine.train_step(batch, ppo_loss)["loss"] == plain.train_step(batch, ppo_loss)["loss"]
        assert all(torch.equal(t, dict(plain.export_weights())[n])
                   for n, t in engine.export_weights())
    finally:
        engine.close()


def _streamed(stream) -> dict[str, torch.Tensor]:
    """The worker's weights now, asked for with the group's ``stream`` (not the copy its
    train reply brought)."""
    return {n: t for pack in stream("export_packed", 1 << 30) for n, t in pack.unpack()}


def test_the_export_folded_into_the_train_call_is_that_steps_weights(tmp_path):
    torch.set_num_threads(1)
    engine = WorkerGroupEngine(make_model(), TrainPlacement(world_size=1), lr=1e-3,
                               token_budget=24)
    calls: list[str] = []
    stream = engine._group.stream

    def counted(method, *args, **kwargs):
        calls.append(method)
        return stream(method, *args, **kwargs)

    engine._group.stream = counted
    try:
        engine.train_step(make_batch(seed=1), ppo_loss)
        first = dict(engine.export_weights())  # asked for: the worker streams them
        assert calls == ["export_packed"] and engine._fold_export is True
        engine.save(str(tmp_path / "step1"))
        previous: dict[str, torch.Tensor] = {}
        kept: dict[str, torch.Tensor] = {}
        for seed in (2, 3):  # now the worker packs them into a slot: no more trips
            engine.train_step(make_batch(seed=seed), ppo_loss)
            if previous:  # the last step's views (the other slot) are intact
                assert all(torch.equal(previous[n], kept[n]) for n in kept)
            folded = dict(engine.export_weights())
            again = dict(engine.export_weights())  # a second replica: the same tensors
            assert calls == ["export_packed"]
            want = _streamed(stream)
            assert folded.keys() == want.keys() == first.keys()
            assert all(torch.equal(folded[n], want[n]) and torch.equal(again[n], want[n])
                       for n in want)
            assert not all(torch.equal(folded[n], first[n]) for n in want)  # it trained
            previous, kept = folded, {n: t.clone() for n, t in folded.items()}
        assert not os.path.exists(engine._slots.target(0).block)  # mapped by both: no file
        engine.load(str(tmp_path / "step1"))  # new weights without a train step: asked for
        calls.clear()
        loaded = dict(engine.export_weights())
        assert calls == ["export_packed"]
        assert all(torch.equal(loaded[n], first[n]) for n in first)
        engine.stream_bytes = 4096  # the model no longer fits one message: streamed again
        engine.train_step(make_batch(seed=4), ppo_loss)
        assert engine._fold_export is False
        calls.clear()
        small = dict(engine.export_weights())
        assert calls == ["export_packed"]
        want = _streamed(stream)
        assert all(torch.equal(small[n], want[n]) for n in want)
        assert engine._slots is None  # the slots went with the folding
    finally:
        engine.close()
