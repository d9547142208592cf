"""A policy's engine-server replica, a real Ray actor, lost mid-episode during a Trainer run on
a local Ray (``num_cpus=2``): its node's processes are gone (``ray.kill`` of the actor and
SIGKILL of its server, which was frozen with a request in flight so that the loss surely
happens mid-request). The request is retried on the live replica (no episode fails), the
replacement joins at the trained weights and version before it takes traffic, and the ledger
adds up."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from areal_agents.agents import ScriptedAgent  # noqa: E402
from areal_agents.engines import GenerateRequest, SamplingParams  # noqa: E402
from areal_agents.trainers.policy import Policy  # noqa: E402
from areal_agents.trainers.ray_actors import JOB_RUNTIME_ENV  # noqa: E402
from areal_agents.trainers.ray_launcher import RayLauncher  # noqa: E402
from areal_agents.trainers.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.slow  # one Ray start and three engine servers (~1-2 min on 2 cores)

WAIT_S = 300  # generous bound on every wait below (a loaded 2-core host)


@pytest.fixture(scope="module")
def cluster() -> Any:
    ray.init(num_cpus=2, num_gpus=8, include_dashboard=False, log_to_driver=False,
             namespace="areal_agents_tests", runtime_env=JOB_RUNTIME_ENV)  # as RayLauncher
    yield
    ray.shutdown()


async def _until(check: Any) -> None:
    """Return once ``check()`` is true (an observable condition, polled on the event loop)."""
    while not check():
        await asyncio.sleep(0.005)


async def _greedy(engine: Any) -> tuple[Any, Any, Any]:
    request = GenerateRequest([1, 2, 3, 4], SamplingParams(max_tokens=4, temperature=0.0))
    out = (await engine.generate(request)).outputs[0]
    return out.token_ids, out.logprobs, out.versions


async def test_a_ray_replica_lost_mid_episode_is_retried_replaced_and_counted(cluster, tmp_path,
                                                                              caplog):
    caplog.set_level(logging.WARNING)
    launcher = RayLauncher(address=None, cpus_per_worker=0.5,
                           autoscale={"speaker": {"min_replicas": 2, "max_replicas": 2}})
    server = {"kind": "server", "replicas": 2, "transport": "shm",
              "server_args": {"threads": 1, "startup_timeout_s": WAIT_S}}
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(lr=1e-2, api="completions", inference=server,
                                    sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(lambda obs: "A")},
        batch_size=4, group_size=2, max_staleness=0, progress=False, launcher=launcher,
        run_dir=tmp_path)
    joins: list[dict[str, Any]] = []

    async def kill_mid_request() -> int:
        """Once a step is trained: freeze replica 1's server, wait for a request in flight on
        it, then lose its node (actor killed, server SIGKILLed); its requests in flight."""
        await _until(lambda: trainer.step >= 1)
        router = trainer.gateway.policies["speaker"].router
        replicas = launcher._replicas["speaker"]
        actor = replicas.actor_of(router.engines[1])
        pid = await actor.pid.remote()
        os.kill(pid, signal.SIGSTOP)  # it accepts no more work, the request stays in flight
        lost = router.engines[1]
        await _until(lambda: lost.num_pending > 0)  # the client's requests in flight to it
        in_flight = lost.num_pending
        ray.kill(actor)
        with pytest.raises(ray.exceptions.RayActorError):  # kill is asynchronous: wait for it
            await asyncio.wait_for(actor.ping.remote(), WAIT_S)
        os.kill(pid, signal.SIGKILL)  # the node is gone: no graceful shutdown of the server
        return in_flight

    try:
        await trainer.setup()
        (spread,) = [ray.util.placement_group_table(g) for g in launcher._groups]
        assert (spread["strategy"], list(spread["bundles"].values())) == (
            "SPREAD", [{"CPU": 0.5}] * 2)  # one bundle per replica
        scaler = launcher._scalers["speaker"]
        join = scaler.join

        async def recorded_join(engine: Any) -> int:  # Trainer.add_replica, observed
            router = scaler.router
            assert engine not in router.engines  # not routable before it has the weights
            index = await join(engine)
            joins.append({"version": engine.version, "index": index,
                          "trained": trainer.train_engines["speaker"].version})
            return index

        scaler.join = recorded_join
        killer = asyncio.ensure_future(asyncio.wait_for(kill_mid_request(), WAIT_S))
        await asyncio.wait_for(trainer.afit(3), 3 * WAIT_S)  # a hang fails, bounded
        in_flight_at_loss = await asyncio.wait_for(killer, WAIT_S)
        router = trainer.gateway.policies["speaker"].router
        first, _lost, replacement = router.engines
        assert router.live_engines() == [first, replacement]
        assert joins == [{"version": joins[0]["trained"], "index": 2,
                          "trained": joins[0]["trained"]}] and joins[0]["trained"] >= 1
        assert first.version == replacement.version == trainer.train_engines["speaker"].version
        assert trainer.step == 3
        reference = await _greedy(first)
        assert await _greedy(replacement) == reference  # same weights: tokens and log-probs
        assert set(reference[2]) == {trainer.step}  # served at the trained version
        counts = trainer.controller.counts()["speaker"]
        errors = list(trainer.controller.errors)
    finally:
        await trainer.aclose()
    assert in_flight_at_loss >= 1
    retried = [r.getMessage() for r in caplog.records
               if r.name.endswith("llm_session") and "Retrying" in r.getMessage()]
    assert len(retried) >= in_flight_at_loss
    assert all("engine replica unavailable" in m for m in retried), retried
    assert errors == [] and counts.get("outcome/failed", 0) == 0  # retried, none failed
    outcomes = sum(v for k, v in counts.items() if k.startswith("outcome/"))
    assert counts["submitted"] == outcomes + counts["running"] + counts["waiting"] + \
        counts["buffered"]
    assert counts["outcome/trained"] >= 3 * 4
    scaled = [r.getMessage() for r in caplog.records if r.name.endswith("autoscale_scaler")
              and "replicas {" in r.getMessage()]
    assert scaled == ["policy 'speaker': replicas {'replaced': 1} (target 2)"]
