"""``launcher: ray`` on a local Ray instance (one per module: ``num_cpus=2`` and 8 logical GPUs,
so placement can be checked on a CPU host): two policies' training groups, a worker group's
ranks as actors, engine-server replicas that join, are killed and replaced."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray")

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate  # noqa: E402
from areal_agents.errors import ConfigError, TrainError  # noqa: E402
from areal_agents.gateway.router import Router  # noqa: E402
from areal_agents.models import tiny  # noqa: E402
from areal_agents.trainers.autoscale import AutoscaleSettings  # noqa: E402
from areal_agents.trainers.autoscale_scaler import ReplicaScaler  # noqa: E402
from areal_agents.trainers.placement import TrainPlacement  # noqa: E402
from areal_agents.trainers.ray_actors import JOB_RUNTIME_ENV  # noqa: E402
from areal_agents.trainers.ray_groups import RayEngineGroup  # noqa: E402
from areal_agents.trainers.ray_launcher import RayLauncher  # noqa: E402
from areal_agents.trainers.ray_replicas import RayReplicaSet  # noqa: E402

pytestmark = pytest.mark.slow  # one Ray start (~15 s on 2 busy cores) and engine servers


@pytest.fixture(scope="module")
def cluster() -> Any:
    ray.init(num_cpus=2, num_gpus=8, include_dashboard=False, log_to_driver=False,
             namespace="areal_agents_tests", runtime_env=JOB_RUNTIME_ENV)  # as RayLauncher
    yield
    ray.shutdown()


def test_two_policies_training_groups_are_strict_packed_gpu_bundles(cluster):
    launcher = RayLauncher(address=None)
    speaker = launcher.group_factory("speaker", TrainPlacement(world_size=4, device="cuda"))
    listener = launcher.group_factory("listener", TrainPlacement(world_size=2, device="cuda"))
    tables = [ray.util.placement_group_table(f.keywords["placement_group"])
              for f in (speaker, listener)]
    assert [t["strategy"] for t in tables] == ["STRICT_PACK", "STRICT_PACK"]
    assert [list(t["bundles"].values()) for t in tables] == [[{"GPU": 1.0}] * 4,
                                                             [{"GPU": 1.0}] * 2]
    assert [t["state"] for t in tables] == ["CREATED", "CREATED"]
    assert speaker.keywords["bundle"] == {"GPU": 1.0}
    assert ray.available_resources().get("GPU", 0) == 2.0  # 8 - 4 - 2 reserved
    asyncio.run(launcher.close())
    assert _eventually(lambda: ray.available_resources().get("GPU") == 8.0)  # groups removed


def test_a_group_the_cluster_cannot_hold_is_a_config_error_naming_the_fix(cluster):
    launcher = RayLauncher(address=None, placement_timeout_s=1)
    with pytest.raises(ConfigError, match=r"launcher: Ray could not place 9 bundles of "
                       r"\{'GPU': 1.0\} \(STRICT_PACK\) within 1 s; the cluster has .*Add "
                       "nodes, lower world_size/replicas or cpus_per_worker"):
        launcher.group_factory("speaker", TrainPlacement(world_size=9, device="cuda"))
    asyncio.run(launcher.close())


def _eventually(check: Any, attempts: int = 100) -> bool:
    """``check()`` becomes true within ``attempts`` polls 0.1 s apart (Ray frees resources
    asynchronously)."""
    import time

    for _ in range(attempts):
        if check():
            return True
        time.sleep(0.1)
    return False


class _SumRank:
    """A rank engine: all-reduces its rank (checks the rendezvous), yields tensors."""

    def __init__(self, scale: float) -> None:
        import torch.distributed as dist

        self.rank, self.scale = dist.get_rank(), scale

    def total(self) -> float:
        import torch.distributed as dist

        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return float(value) * self.scale

    def echo(self, x: int) -> tuple[int, int]:
        return self.rank, x

    def weights(self):
        for i in range(3):
            yield f"w{i}", torch.full((2,), float(i))

    def nice(self) -> int:
        import os

        return os.nice(0)

    def fail(self) -> None:
        if self.rank == 1:
            raise RuntimeError("rank one broke")


def test_worker_group_ranks_rendezvous_from_the_placement(cluster):
    import sys

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import it
    launcher = RayLauncher(address=None, cpus_per_worker=0.5)
    group_cls = launcher.group_factory("speaker", TrainPlacement(world_size=2, device="cpu"))
    group: RayEngineGroup = group_cls(2, _SumRank, 10.0, device="cpu", start_timeout=120)
    try:
        assert group.call("total") == [30.0, 30.0]  # (1 + 2) * 10 on both ranks: gloo works
        assert group.call_each("echo", [((5,), {}), ((6,), {})]) == [(0, 5), (1, 6)]
        assert group.call("nice") == [os.nice(0)] * 2  # the driver's priority, not Ray's 15
        assert [(n, t.tolist()) for n, t in group.stream("weights")] == [
            ("w0", [0.0, 0.0]), ("w1", [1.0, 1.0]), ("w2", [2.0, 2.0])]
        with pytest.raises(TrainError, match=r"(?s)engine rank 1 failed:.*rank one broke"):
            group.call("fail")
        assert group.call("total") == [30.0, 30.0]  # a raised error leaves the group usable
        ray.kill(group._actors[1])
        _wait_dead(group._actors[1])  # else the next call may still be answered
        with pytest.raises(TrainError, match="died during total"):
            group.call("total")
        with pytest.raises(TrainError, match="the worker group was stopped"):
            group.call("echo", 1)
    finally:
        group.close()
        asyncio.run(launcher.close())


def _wait_dead(actor: Any, timeout_s: float = 120.0) -> None:
    """Return once Ray reports ``actor`` dead: the kill is asynchronous, and a call right after
    ``ray.kill`` may still be answered (1 of 15 in a loop on this host)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=timeout_s)  # every actor has it
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"the killed actor still answered after {timeout_s} s")


def _greedy(engine: Any) -> Any:
    request = GenerateRequest([1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0))
    out = asyncio.get_event_loop().run_until_complete(engine.generate(request)).outputs[0]
    return out.token_ids, out.logprobs, out.versions


def test_replicas_join_at_the_current_weights_and_a_killed_one_is_replaced(cluster, model_dir):
    from areal_agents.engines.local import LocalEngine
    from areal_agents.testing.engine import ScriptedEngine

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    run = loop.run_until_complete
    replicas = RayReplicaSet(model_dir, {"CPU": 0.5}, transport="disk", startup_timeout_s=240)
    trained = list(tiny("xs", seed=3)[0].state_dict().items())  # "the current weights"
    reference = LocalEngine(str(model_dir))
    run(reference.update_weights(WeightUpdate(named_tensors=trained, version=4)))
    first = ScriptedEngine()  # the policy's first replica (a fake: the queue builds up on it)
    router = Router([first])

    async def join(engine: Any) -> int:  # what Trainer.add_replica does through the gateway
        await engine.update_weights(WeightUpdate(named_tensors=trained, version=4))
        return router.add(engine)

    settings = AutoscaleSettings(min_replicas=1, max_replicas=2, scale_up_queue=2,
                                 scale_down_queue=0.5, up_after_s=0, cooldown_s=0)
    scaler = ReplicaScaler("listener", router, replicas, settings, join=join)
    try:
        held = [router.acquire()[0] for _ in range(4)]  # a synthetic queue of 4
        scaler.sample()
        metrics = run(scaler.reconcile())
        assert metrics["autoscale/listener/scale_up"] == 1.0
        joined = router.engines[1]
        assert joined.url.startswith("http://") and joined.version == 4
        assert _greedy(joined) == _greedy(reference)  # the trained weights, at version 4
        actor = replicas.actor_of(joined)
        server_pid = ray.get(actor.pid.remote())
        assert os.getpriority(os.PRIO_PROCESS, server_pid) == os.nice(0)  # not Ray's 15
        ray.kill(actor)  # its node is lost: actor and server end
        _wait_dead(actor)
        for index in held:
            router.release(index)
        metrics = run(scaler.reconcile())
        assert metrics["autoscale/listener/replaced"] == 1.0
        replacement = router.engines[2]
        assert router.live_engines() == [first, replacement]
        assert replacement.version == 4 and _greedy(replacement) == _greedy(reference)
    finally:
        for engine in router.engines[1:]:
            run(replicas.stop(engine))
        replicas.close()
        run(reference.close())
        loop.close()
