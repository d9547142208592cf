"""``VLLMEngine``'s NCCL weight transfer: the request sequence and bodies of vLLM 0.32's RL
routes (``vllm/entrypoints/rl/online/api_router.py``), replayed through ``httpx2.MockTransport``;
the live GPU test is marked ``cuda``."""

from __future__ import annotations

import json
import os
import threading

import httpx2
import pytest
import torch

from areal_agents.engines.vllm import VLLMEngine
from areal_agents.engines.vllm_weights import nccl_init_info, nccl_update_info
from areal_agents.errors import WeightSyncError

URL = "http://vllm"
ANSWERS = {  # vLLM 0.32's answers on these routes
    "/init_weight_transfer_engine": {"message": "Weight transfer initialized"},
    "/start_weight_update": {"message": "Weight update started"},
    "/update_weights": {"message": "Weights updated"},
    "/finish_weight_update": {"message": "Weight update finished"},
}


class FakeVLLM:
    """Answers the RL routes like vLLM and logs ``(path, query, body)``; ``/update_weights``
    answers only once the trainer's broadcast has started (they must run concurrently)."""

    def __init__(self, fail_update: bool = False) -> None:
        self.log: list[tuple[str, str, object]] = []
        self.broadcasting = threading.Event()
        self.fail_update = fail_update

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        self.log.append((path, request.url.query.decode(), body))
        if path == "/update_weights":
            assert self.broadcasting.wait(30), "the broadcast did not run during the call"
            if self.fail_update:
                return httpx2.Response(500, json={"error": "NCCL error: unhandled system error"})
        if path == "/update_weight_version":
            return httpx2.Response(200, json={"success": True, "new_version": body["new_version"]})
        return httpx2.Response(200, json=ANSWERS.get(path, {}))


def _engine(fake: FakeVLLM) -> VLLMEngine:
    return VLLMEngine(URL, model="m", max_context=64, version=3,
                      transport=httpx2.MockTransport(fake))


async def test_init_joins_the_trainers_group():
    fake = FakeVLLM()
    engine = _engine(fake)
    await engine.init_weight_transfer("10.0.0.1", 29500, 3, rank_offset=1)
    assert fake.log == [("/init_weight_transfer_engine", "", {"init_info": {
        "master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 3,
        "packed": False}})]
    await engine.close()


async def test_an_update_runs_the_broadcast_during_update_weights_and_bumps_the_version():
    fake = FakeVLLM()
    engine = _engine(fake)
    sent: list[str] = []

    def broadcast() -> None:
        fake.broadcasting.set()
        sent.append("w")

    await engine.update_weights_nccl(["model.w", "lm_head.weight"], ["bfloat16", "float32"],
                                     [(2, 3), torch.Size([4])], broadcast=broadcast)
    assert sent == ["w"] and engine.version == 4
    assert fake.log == [
        ("/pause", "mode=keep", None),
        ("/start_weight_update", "", None),
        ("/update_weights", "", {"update_info": {"names": ["model.w", "lm_head.weight"],
                                                 "dtype_names": ["bfloat16", "float32"],
                                                 "shapes": [[2, 3], [4]]}}),
        ("/finish_weight_update", "", None),
        ("/reset_prefix_cache", "reset_running_requests=true", None),
        ("/update_weight_version", "", {"new_version": "4"}),
        ("/resume", "", None),
    ]
    await engine.close()


@pytest.mark.parametrize("side", ["server", "trainer"])
async def test_a_failed_side_raises_weight_sync_error_and_resumes(side):
    fake = FakeVLLM(fail_update=side == "server")

    def broadcast() -> None:
        fake.broadcasting.set()
        if side == "trainer":
            raise RuntimeError("NCCL timeout")

    engine = _engine(fake)
    with pytest.raises(WeightSyncError) as info:
        await engine.update_weights_nccl(["w"], ["float32"], [[2]], broadcast=broadcast,
                                         version=9)
    assert str(info.value).startswith("the NCCL weight update to version 9 failed (")
    assert str(info.value).endswith("); the server may hold part of it: push a full update "
                                    "(e.g. from disk)")
    assert engine.version == 3
    paths = [path for path, _, _ in fake.log]
    assert paths[-1] == "/resume" and "/finish_weight_update" not in paths
    assert "/update_weight_version" not in paths
    await engine.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank_offset": 0}, "rank_offset=0, world_size=2: the trainer is rank 0, so rank_offset >= "
                         "1 and world_size > rank_offset"),
    ({"rank_offset": 2}, "rank_offset=2, world_size=2: the trainer is rank 0, so rank_offset >= "
                         "1 and world_size > rank_offset"),
])
def test_init_info_refuses_impossible_ranks(kwargs, message):
    with pytest.raises(ValueError) as info:
        nccl_init_info("h", 1, 2, **kwargs)
    assert str(info.value) == message


def test_update_info_checks_lengths_and_dtype_names():
    with pytest.raises(ValueError) as info:
        nccl_update_info(["a", "b"], ["float32"], [[1], [2]])
    assert str(info.value) == "names, dtype_names and shapes differ in length (2, 1, 2)"
    with pytest.raises(ValueError) as info:
        nccl_update_info(["a"], ["torch.float32"], [[1]])
    assert str(info.value) == ("dtype names are torch attribute names without 'torch.' (e.g. "
                               "'bfloat16'), got ['torch.float32']")
    assert nccl_init_info("h", 1, 2, packed=True, packed_buffer_size_bytes=2**20,
                          packed_num_buffers=2) == {
        "master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 2,
        "packed": True, "packed_buffer_size_bytes": 2**20, "packed_num_buffers": 2}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not os.environ.get("AREAL_AGENTS_VLLM_PYTHON"),
                    reason="needs CUDA and a GPU vLLM venv ($AREAL_AGENTS_VLLM_PYTHON)")
async def test_live_nccl_update_changes_the_served_weights(tmp_path):  # pragma: no cover
    """On a GPU host: launch vLLM (``--weight-transfer-config '{"backend": "nccl"}'``), join
    its group with vLLM's own trainer engine in a subprocess of the vLLM venv, push zeroed
    ``lm_head`` weights and see greedy outputs change and the version bump."""
    import subprocess
    import sys

    from areal_agents.engines.base import GenerateRequest, SamplingParams
    from areal_agents.engines.server_process import free_port
    from areal_agents.models import tiny

    model, tok = tiny("xs", seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    python = os.environ["AREAL_AGENTS_VLLM_PYTHON"]
    engine = await VLLMEngine.launch(tmp_path / "m", python=python, chunked_prefill=True,
                                     server_args=["--weight-transfer-config",
                                                  '{"backend": "nccl"}'])
    try:
        request = GenerateRequest([3, 5, 7], SamplingParams(max_tokens=4, temperature=0.0))
        before = (await engine.generate(request)).outputs[0].token_ids
        port = free_port()
        head = model.state_dict()["lm_head.weight"]
        script = (
            "import sys, torch\n"
            "from vllm.distributed.weight_transfer.nccl_common import trainer_init\n"
            f"comm = trainer_init({{'master_address': '127.0.0.1', 'master_port': {port}, "
            "'world_size': 2})\n"
            f"w = torch.zeros({list(head.shape)}, dtype=torch.{str(head.dtype)[6:]}, "
            "device='cuda')\n"
            "comm.broadcast(w, src=0, stream=torch.cuda.current_stream())\n"
            "torch.cuda.synchronize()\n")
        trainer = subprocess.Popen([python, "-c", script], stdout=sys.stderr)
        await engine.init_weight_transfer("127.0.0.1", port, 2)
        await engine.update_weights_nccl(
            ["lm_head.weight"], [str(head.dtype)[6:]], [list(head.shape)],
            broadcast=lambda: trainer.wait(timeout=300), version=1)
        assert trainer.returncode == 0
        after = (await engine.generate(request)).outputs[0]
        assert after.token_ids != before and after.versions == [1] * 4
    finally:
        await engine.close()
