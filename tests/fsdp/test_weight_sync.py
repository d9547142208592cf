"""Weight buckets, safetensors directories, in-process push and SGLang/vLLM request formats."""

from __future__ import annotations

import json
import os

import pytest
import torch

from areal_agents.engines.base import WeightUpdate
from areal_agents.trainers.weight_sync import (
    INDEX_FILE,
    buckets,
    deserialize_named_tensors,
    load_safetensors_dir,
    save_safetensors_dir,
    sglang_update_from_disk,
    sglang_update_from_tensor,
    vllm_collective_rpc,
    vllm_update_from_disk,
)

from ._helpers import make_batch, make_engine, make_model, ppo_loss


def _named(*sizes):
    return [(f"w{i}", torch.full((n,), float(i))) for i, n in enumerate(sizes)]


def test_buckets_bounded_and_ordered():
    named = _named(10, 10, 30, 5, 5)  # float32: 40, 40, 120, 20, 20 bytes
    got = list(buckets(named, bucket_bytes=80))
    assert [[n for n, _ in b] for b in got] == [["w0", "w1"], ["w2"], ["w3", "w4"]]
    assert [sum(t.numel() * 4 for _, t in b) for b in got] == [80, 120, 40]
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(buckets(named, 0))
    assert list(buckets([], 10)) == []


def test_safetensors_dir_round_trip_with_index(tmp_path):
    engine = make_engine()
    engine.train_step(make_batch(), ppo_loss)
    exported = dict(engine.export_weights())
    path = save_safetensors_dir(engine.export_weights(), str(tmp_path / "w"), bucket_bytes=40_000)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(path, INDEX_FILE)) as fh:
        index = json.load(fh)
    assert set(index["weight_map"]) == set(exported)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in exported.values())
    loaded = dict(load_safetensors_dir(path))
    assert loaded.keys() == exported.keys()
    for n, t in exported.items():
        assert torch.equal(loaded[n], t)
    # replaced atomically on a second write; no temp dirs left behind
    save_safetensors_dir(engine.export_weights(), path)
    assert sorted(os.listdir(tmp_path)) == ["w"]
    with pytest.raises(FileNotFoundError, match="safetensors"):
        list(load_safetensors_dir(str(tmp_path)))


async def test_push_through_directory_into_local_engine(tmp_path):
    from areal_agents.engines.local import LocalEngine

    class Tok:
        eos_token_id = -1

    trainer = make_engine(lr=1e-2)
    batch = make_batch()
    trainer.train_step(batch, ppo_loss)
    path = save_safetensors_dir(trainer.export_weights(), str(tmp_path / "v1"))
    engine = LocalEngine(make_model(seed=5), Tok())
    await engine.update_weights(WeightUpdate(path=path, version=3))
    assert engine.version == 3
    for n, t in trainer.export_weights():
        assert torch.equal(engine.model.state_dict()[n], t), n
    await engine.close()


def test_sglang_requests():
    req = sglang_update_from_disk("/ckpt/v3", version=3)
    assert (req.method, req.path) == ("POST", "/update_weights_from_disk")
    assert req.json == {"model_path": "/ckpt/v3", "abort_all_requests": False, "weight_version": "3"}
    assert "load_format" not in req.json
    named = _named(3, 2)
    req = sglang_update_from_tensor(named, version=4, tp_size=2)
    assert req.path == "/update_weights_from_tensor"
    assert set(req.json) == {"serialized_named_tensors", "load_format", "flush_cache", "weight_version"}
    assert len(req.json["serialized_named_tensors"]) == 2 and req.json["flush_cache"] is True
    json.dumps(req.json)  # JSON-serialisable as sent
    decoded = deserialize_named_tensors(req.json["serialized_named_tensors"][1])
    assert [n for n, _ in decoded] == ["w0", "w1"]
    assert torch.equal(decoded[1][1], named[1][1])


def test_vllm_requests():
    req = vllm_update_from_disk("/ckpt/v5", version=5)
    assert (req.method, req.path) == ("POST", "/collective_rpc")
    assert req.json == {"method": "update_weights_from_disk", "args": ["/ckpt/v5"],
                        "kwargs": {"version": 5}, "timeout": None}
    assert vllm_collective_rpc("reload_weights", timeout=30.0).json["timeout"] == 30.0


@pytest.mark.slow
def test_shared_memory_to_another_process():
    import multiprocessing as mp

    from areal_agents.trainers.weight_sync import SharedWeights, read_shared

    from ._helpers import read_shared_into_model

    trainer = make_engine(lr=1e-2)
    batch = make_batch()
    trainer.train_step(batch, ppo_loss)
    exported = {n: t.clone() for n, t in trainer.export_weights()}
    exported["half"] = torch.arange(5, dtype=torch.bfloat16)  # odd size and dtype
    with SharedWeights.write(exported.items()) as shared:
        same_process = dict(read_shared(shared.manifest))
        assert same_process.keys() == exported.keys()
        for n, t in exported.items():
            assert same_process[n].dtype == t.dtype and torch.equal(same_process[n], t)
        del exported["half"]
        shared2 = SharedWeights.write(exported.items())
        with mp.get_context("spawn").Pool(1) as pool:
            names, logits = pool.apply(read_shared_into_model, (shared2.manifest,))
        shared2.close()
        shared2.close()  # idempotent
    assert names == sorted(exported)
    with torch.no_grad():
        want = trainer.model(input_ids=batch.input_ids,
                             attention_mask=batch.attention_mask.long()).logits
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
