"""``RemoteEngine`` against real engine-server processes (slow: each start loads torch).

At most one server runs at a time: the module's server serves the first tests and is killed by
the fault test; the restart test launches its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.remote import RemoteEngine
from areal_agents.errors import EngineError, EngineUnavailable
from areal_agents.models import tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def remote(model_dir: Path, loop: Any) -> Any:
    engine = loop.run_until_complete(RemoteEngine.launch(model_dir, max_batch_size=8,
                                                         transport="shm"))
    yield engine
    loop.run_until_complete(engine.close())
    assert not engine.server.running


def _req(prompt: list[int], **kw: Any) -> GenerateRequest:
    return GenerateRequest(list(prompt), SamplingParams(**kw))


def _seed_weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    return list(tiny("xs", seed=seed)[0].state_dict().items())


def test_greedy_ids_and_logprobs_equal_an_in_process_local_engine(remote, model_dir, loop):
    """Bitwise, against a LocalEngine on the model loaded from the same directory (the
    in-memory tiny model differs from its reloaded copy by ~5e-7 in log-probs, in process)."""
    torch.set_num_threads(1)
    _, tok = tiny("xs", seed=0)
    prompt = tok.encode("12 + 30 = ? Answer:")

    async def both() -> tuple[Any, Any]:
        async with LocalEngine(str(model_dir)) as local:
            req = _req(prompt, max_tokens=16, temperature=0)
            return (await remote.generate(req)).outputs[0], (await local.generate(req)).outputs[0]

    via_server, in_process = loop.run_until_complete(both())
    assert via_server == in_process  # ids, log-probs, versions, finish reason
    assert via_server.versions == [0] * 16


def test_a_shared_memory_update_changes_outputs_and_bumps_the_version(remote, loop):
    _, tok = tiny("xs", seed=0)
    prompt = tok.encode("1 + 2 =")
    greedy = _req(prompt, max_tokens=8, temperature=0)
    before = loop.run_until_complete(remote.generate(greedy)).outputs[0]
    loop.run_until_complete(remote.update_weights(WeightUpdate(named_tensors=iter(
        _seed_weights(1)))))
    after = loop.run_until_complete(remote.generate(greedy)).outputs[0]
    assert remote.version == 1 and after.versions == [1] * 8
    assert after.logprobs != before.logprobs


def test_pause_holds_requests_in_flight_until_resume(remote, loop):
    async def scenario() -> tuple[bool, Any]:
        await remote.pause()
        task = asyncio.ensure_future(remote.generate(_req([5, 6, 7], max_tokens=12, seed=0)))
        await asyncio.sleep(0.5)
        held = not task.done() and remote.num_pending == 1
        await remote.resume()
        return held, await task

    held, result = loop.run_until_complete(scenario())
    assert held and len(result.outputs[0].token_ids) <= 12 and remote.num_pending == 0


def test_a_killed_server_makes_requests_unavailable_with_its_log_tail(remote, loop):
    os.killpg(remote.server.pid, signal.SIGKILL)
    with pytest.raises(EngineUnavailable) as info:
        loop.run_until_complete(remote.generate(_req([1, 2], max_tokens=2)))
    message = str(info.value)
    assert f"The server process is exited (-{signal.SIGKILL.value})" in message
    assert "engine server: " in message  # the log's start-up line
    assert not remote.alive
    with pytest.raises(EngineError, match="was restarted 0 times already"):
        loop.run_until_complete(remote.restart())  # restart_limit=0


def test_a_restarted_server_holds_the_latest_weights_and_version(model_dir, loop):
    torch.set_num_threads(1)

    async def scenario() -> tuple[Any, Any, RemoteEngine]:
        engine = await RemoteEngine.launch(model_dir, restart_limit=1)
        try:
            await engine.update_weights(WeightUpdate(named_tensors=iter(_seed_weights(1))))
            os.killpg(engine.server.pid, signal.SIGKILL)
            with pytest.raises(EngineUnavailable):
                await engine.generate(_req([1, 2], max_tokens=2))
            # an update while dead is kept for the restart
            await engine.update_weights(WeightUpdate(named_tensors=iter(_seed_weights(2))))
            await engine.restart()
            greedy = _req([3, 4, 5], max_tokens=8, temperature=0)
            served = (await engine.generate(greedy)).outputs[0]
            model, tok = tiny("xs", seed=2)
            async with LocalEngine(model, tok) as local:
                local.version = 2
                expected = (await local.generate(greedy)).outputs[0]
            with pytest.raises(EngineError, match=r"restarted 1 times already"):
                await engine.restart()
            return served, expected, engine
        finally:
            await engine.close()

    served, expected, engine = loop.run_until_complete(scenario())
    assert engine.version == 2 and engine.num_restarts == 1
    assert served.token_ids == expected.token_ids and served.versions == [2] * 8
    assert not engine.server.running


def test_a_server_that_cannot_start_reports_its_log(tmp_path, loop):
    with pytest.raises(EngineError, match=r"(?s)exited with code 1 before it was ready; its "
                                          r"last log lines .*no checkpoint at"):
        loop.run_until_complete(RemoteEngine.launch(tmp_path / "missing", startup_timeout_s=60))
