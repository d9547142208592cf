"""NCCLTransport over a real process group: 2 gloo processes on CPU (NCCL on 2 GPUs: ``cuda``).

Rank 0 sends four updates; rank 1 receives them: a complete one, one whose source fails after
six tensors, one the receiver stops reading early, then a fourth complete one (the group is
still in step after the failures).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from areal_agents.errors import WeightSyncError

BUCKET_BYTES = 64


def weights() -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes, a 0-d tensor, and one tensor (lm_head, 256 bytes) over the bucket."""
    g = torch.Generator().manual_seed(0)
    out = [(f"model.layers.{i}.w", torch.randn(3, i + 1, generator=g).to(torch.bfloat16))
           for i in range(6)]
    out += [("model.norm.weight", torch.randn(5, generator=g)),
            ("step", torch.tensor(7, dtype=torch.int64)),
            ("lm_head.weight", torch.randn(16, 4, generator=g))]
    return out


def _failing() -> Iterator[tuple[str, torch.Tensor]]:
    yield from weights()[:6]
    raise RuntimeError("export failed")


def _worker(rank: int, init_file: str, out_dir: str, backend: str) -> None:
    from areal_agents.trainers.weight_nccl import NCCLTransport

    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    transport = NCCLTransport(src=0, bucket_bytes=BUCKET_BYTES, device=device)
    log: dict[str, object] = {}
    try:
        if rank == 0:
            log["sent"] = transport.send((n, t.to(device)) for n, t in weights())
            try:
                transport.send(_failing())
            except RuntimeError as exc:
                log["abort"] = str(exc)
            transport.send(weights())  # the receiver stops after one tensor
            log["sent_again"] = transport.send(weights())
        else:
            manifest = transport.manifest()
            log["update"] = [(n, t.cpu()) for n, t in transport.receive(manifest)]
            partial: list[str] = []
            try:
                for name, _ in transport.receive(manifest):
                    partial.append(name)
            except WeightSyncError as exc:
                log["abort"] = (partial, str(exc))
            stream = transport.receive(manifest)
            log["first_only"] = next(stream)[0]
            stream.close()  # drops the rest, staying in step with the sender
            log["update_again"] = [(n, t.cpu()) for n, t in transport.receive(manifest)]
    finally:
        torch.save(log, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _run(tmp_path, backend: str) -> tuple[dict, dict]:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), backend), nprocs=2)
    return (torch.load(tmp_path / "rank0.pt", weights_only=False),
            torch.load(tmp_path / "rank1.pt", weights_only=False))


def _check(sender: dict, receiver: dict) -> None:
    expected = weights()
    total = sum(t.numel() * t.element_size() for _, t in expected)
    assert sender == {"sent": total, "abort": "export failed", "sent_again": total}
    for key in ("update", "update_again"):
        got = receiver[key]
        assert [n for n, _ in got] == [n for n, _ in expected]
        for (_, a), (_, b) in zip(expected, got, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    partial, message = receiver["abort"]
    # buckets of <= 64 bytes: [w0..w3] (6+12+18+24 bytes), [w4]; w5's bucket never leaves
    assert partial == [f"model.layers.{i}.w" for i in range(5)]
    assert message == ("the sender aborted the update (RuntimeError('export failed')); "
                       "discard what was received")
    assert receiver["first_only"] == "model.layers.0.w"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_gloo_broadcast_keeps_order_contents_and_survives_failures(tmp_path):
    _check(*_run(tmp_path, "gloo"))


@pytest.mark.cuda
@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 CUDA devices")
def test_nccl_broadcast_keeps_order_contents_and_survives_failures(tmp_path):
    _check(*_run(tmp_path, "nccl"))
