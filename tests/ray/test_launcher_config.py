"""``launcher`` from YAML and Python, without starting Ray (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from areal_agents.config import load_config
from areal_agents.engines.service import parse_args
from areal_agents.errors import ConfigError
from areal_agents.trainers.autoscale import AutoscaleSettings
from areal_agents.trainers.placement import TrainPlacement
from areal_agents.trainers.ray_launcher import (
    LocalLauncher,
    RayLauncher,
    resolve_launcher,
    train_bundles,
)

YAML = Path(__file__).parents[2] / "examples" / "signaling" / "two_llms_ray.yaml"


def test_the_ray_example_builds_a_trainer_with_its_launcher():
    trainer = load_config(YAML).build()
    launcher = trainer.launcher
    assert isinstance(launcher, RayLauncher)
    assert (launcher.address, launcher.num_cpus, launcher.cpus_per_worker) == (None, 2, 0.5)
    assert launcher.autoscale == {"listener": AutoscaleSettings(
        min_replicas=1, max_replicas=2, scale_up_queue=16, scale_down_queue=2, up_after_s=5,
        down_after_s=30, cooldown_s=10)}
    assert trainer.policies["speaker"].train == TrainPlacement(world_size=2, threads=1)


def test_without_launcher_the_trainer_keeps_the_local_null_launcher():
    cfg = load_config(YAML, ["launcher=local"])
    assert repr(cfg.build().launcher) == "LocalLauncher()"
    assert LocalLauncher().group_factory("p", TrainPlacement(world_size=2)) is None


@pytest.mark.parametrize(("value", "message"), [
    ("slurm", "launcher='slurm'; use 'local', 'ray' or {kind: ray, address: ..., "
              "autoscale: {...}}"),
    ({"kind": "ray", "adress": "auto"},
     "launcher: unknown field(s) ['adress']; known: ['address', 'autoscale', "
     "'cpus_per_worker', 'namespace', 'num_cpus', 'num_gpus', 'placement_timeout_s']"),
    ({"kind": "ray", "autoscale": {"listener": {"min_replicas": 0}}},
     "autoscale.min_replicas must be an integer >= 1, got 0"),
])
def test_bad_launchers_are_config_errors_naming_the_fix(value, message):
    with pytest.raises(ConfigError) as err:
        resolve_launcher(value)
    assert str(err.value) == message


def test_yaml_rejects_an_unknown_launcher_name():
    with pytest.raises(ConfigError, match="launcher"):
        load_config(YAML, ["launcher=slurm"])


def test_one_bundle_per_rank_gpu_on_cuda_cpus_on_cpu():
    assert train_bundles(TrainPlacement(world_size=4, device="cuda"), 2.0) == [{"GPU": 1.0}] * 4
    assert train_bundles(TrainPlacement(world_size=2), 0.5) == [{"CPU": 0.5}] * 2


def test_engine_server_binds_127_0_0_1_unless_given_a_host():
    assert parse_args(["--model", "m", "--port", "1"]).host == "127.0.0.1"
    assert parse_args(["--model", "m", "--port", "1", "--host", "10.0.0.5"]).host == "10.0.0.5"


def test_a_cuda_group_placed_elsewhere_skips_the_controllers_gpu_check():
    from areal_agents.trainers.worker_group import WorkerGroupEngine

    built = []

    class _Group:  # stands in for a RayEngineGroup bound to GPU bundles on other nodes
        def __init__(self, num_processes, factory, *args, device=None, **kwargs):
            built.append((num_processes, device))

    WorkerGroupEngine("tiny:xs", TrainPlacement(world_size=2, device="cuda"), group=_Group)
    assert built == [(2, "cuda")]


FROM_EXAMPLE = {"scale_up_queue": 16, "scale_down_queue": 2, "up_after_s": 5,
                "down_after_s": 30, "cooldown_s": 10}  # the example's listener settings


def test_address_auto_and_the_latency_rule_are_the_same_from_python_and_yaml():
    settings = {"min_replicas": 1, "max_replicas": 3, "metric": "latency",
                "scale_up_latency_s": 4.0, "scale_down_latency_s": 1.0, "latency_quantile": 0.5}
    cfg = load_config(YAML, ["launcher.address=auto", "launcher.autoscale.listener.metric=latency",
                             "launcher.autoscale.listener.scale_up_latency_s=4.0",
                             "launcher.autoscale.listener.scale_down_latency_s=1.0",
                             "launcher.autoscale.listener.latency_quantile=0.5",
                             "launcher.autoscale.listener.max_replicas=3"])
    from_yaml = resolve_launcher(cfg.launcher)
    from_python = RayLauncher(address="auto", num_cpus=2, cpus_per_worker=0.5,
                              autoscale={"listener": {**FROM_EXAMPLE, **settings}})
    assert from_yaml == from_python
    assert from_yaml.autoscale["listener"].metric == "latency"
    assert resolve_launcher("ray") == RayLauncher() and RayLauncher().address == "auto"

