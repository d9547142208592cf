"""Placement types: defaults, derived dp, rank layout, backend support table, YAML spelling."""

from __future__ import annotations

import pytest

from areal_agents.config import PolicyConfig, parse_config
from areal_agents.errors import ConfigError
from areal_agents.trainers.placement import (
    InferencePlacement,
    TrainPlacement,
    check_train_placement,
    engine_parallel_kwargs,
)
from areal_agents.trainers.policy import Policy


def test_default_train_placement_is_one_process():
    p = Policy().train
    assert p == TrainPlacement(world_size=1, dp=1, tp=1, pp=1, ep=1, device=None, threads=1)
    assert not p.distributed


def test_workers_trains_one_rank_out_of_the_controller():
    """``train: {workers: true}`` at world_size 1: a worker group of one rank (training off
    the controller's process and GIL), checked like any other layout."""
    p = Policy(train={"workers": True}).train
    assert (p.world_size, p.dp, p.distributed) == (1, 1, True)
    check_train_placement("fsdp", p)
    with pytest.raises(ConfigError, match="world_size=1 but the policy is frozen"):
        check_train_placement("fsdp", p, trainable=False)


@pytest.mark.parametrize(("kwargs", "dp"), [({"world_size": 2}, 2), ({"world_size": 4, "tp": 2}, 2),
                                            ({"world_size": 8, "tp": 2, "pp": 2}, 2),
                                            ({"world_size": 2, "tp": 2}, 1)])
def test_dp_is_derived(kwargs, dp):
    assert TrainPlacement(**kwargs).dp == dp


def test_rank_layout_tp_innermost_pp_outermost():
    p = TrainPlacement(world_size=8, tp=2, pp=2)  # dp = 2
    assert [p.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=8\), got 8"):
        p.dp_rank(8)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"world_size": 3, "tp": 2},
     "Policy.train: world_size=3 is not divisible by tp*pp=2; set world_size to a multiple of it"),
    ({"world_size": 4, "dp": 4, "tp": 2},
     "Policy.train: dp*tp*pp = 4*2*1 = 8 must equal world_size=4; set world_size=8 or leave dp "
     "unset (derived)"),
    ({"world_size": 0}, "Policy.train.world_size must be an integer >= 1, got 0"),
    ({"threads": 1.5}, "Policy.train.threads must be an integer >= 1, got 1.5"),
    ({"tp": True}, "Policy.train.tp must be an integer >= 1, got True"),
    ({"device": "tpu"}, "Policy.train.device='tpu'; choose one of ['cpu', 'cuda'] (or omit it)"),
])
def test_impossible_layouts(kwargs, message):
    with pytest.raises(ConfigError) as info:
        TrainPlacement(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(("backend", "kwargs", "message"), [
    ("fsdp", {"world_size": 2, "tp": 2},
     "Policy.train: fsdp supports only data parallelism (dp); use backend='archon' for tp=2"),
    ("fsdp", {"world_size": 4, "pp": 2},
     "Policy.train: fsdp supports only data parallelism (dp); use backend='archon' for pp=2"),
    ("megatron", {"world_size": 2, "pp": 2},
     "Policy.train: megatron supports dp, tp; use backend='archon' for pp=2"),
    ("archon", {"world_size": 4, "tp": 2, "ep": 4},
     "Policy.train: ep=4 must be 1 or dp=2 (experts are split over the data-parallel ranks)"),
])
def test_backend_support_table(backend, kwargs, message):
    with pytest.raises(ConfigError) as info:
        check_train_placement(backend, TrainPlacement(**kwargs))
    assert str(info.value) == message


@pytest.mark.parametrize(("backend", "kwargs"), [
    ("fsdp", {"world_size": 2}), ("archon", {"world_size": 2, "tp": 2}),
    ("archon", {"world_size": 4, "tp": 2, "ep": 2}), ("archon", {"world_size": 2, "pp": 2}),
    ("megatron", {"world_size": 4, "tp": 2}),
])
def test_supported_layouts_pass(backend, kwargs):
    check_train_placement(backend, TrainPlacement(**kwargs))


def test_unregistered_backend_trains_in_one_process_only():
    check_train_placement("mine", TrainPlacement())
    with pytest.raises(ConfigError, match="backend 'mine' has no multi-process support registered"):
        check_train_placement("mine", TrainPlacement(world_size=2))


def test_frozen_policy_cannot_have_workers():
    with pytest.raises(ConfigError) as info:
        Policy(frozen=True, train={"world_size": 2})
    assert str(info.value) == ("Policy.train: world_size=2 but the policy is frozen (no train "
                               "engine); remove train or set frozen=False")


def test_engine_parallel_kwargs():
    assert engine_parallel_kwargs("fsdp", TrainPlacement(world_size=2)) == {}
    assert engine_parallel_kwargs("archon", TrainPlacement(world_size=2, tp=2)) == {
        "dp_shard": 1, "tp": 2, "pp": 1, "ep": 1}
    assert engine_parallel_kwargs("megatron", TrainPlacement(world_size=4, tp=2)) == {
        "tensor_parallel": 2}


def test_policy_coerces_dicts_and_refuses_bad_layouts():
    assert Policy(backend="archon", train={"world_size": 2, "tp": 2}).train.tp == 2
    with pytest.raises(ConfigError, match="fsdp supports only data parallelism"):
        Policy(train={"world_size": 2, "tp": 2})
    with pytest.raises(ConfigError) as info:
        Policy(train={"world_sze": 2})
    assert str(info.value) == ("Policy.train: unknown field(s) ['world_sze']; known: ['cpus', "
                               "'device', 'dp', 'ep', 'pp', 'threads', 'tp', 'workers', "
                               "'world_size']")
    with pytest.raises(ConfigError) as info:
        Policy(train=2)
    assert str(info.value) == "Policy.train must be a TrainPlacement or a dict of its fields, got int"


# ---- inference --------------------------------------------------------------------------------

def test_inference_shorthand_and_auto_transport():
    assert Policy(inference="vllm").inference == InferencePlacement(kind="vllm")
    assert Policy().inference.resolved_transport() == "tensors"
    assert InferencePlacement(kind="server").resolved_transport() == "shm"
    assert InferencePlacement(kind="sglang").resolved_transport() == "disk"
    assert InferencePlacement(kind="vllm", transport="nccl").resolved_transport() == "nccl"


def test_urls_set_the_replicas():
    p = InferencePlacement(kind="vllm", urls=["http://a:8000", "http://b:8000"])
    assert (p.replicas, p.urls) == (2, ("http://a:8000", "http://b:8000"))
    with pytest.raises(ConfigError) as info:
        InferencePlacement(kind="vllm", replicas=3, urls=("http://a:8000",))
    assert str(info.value) == ("Policy.inference: replicas=3 but 1 urls; with urls there is one "
                               "replica per URL (drop replicas)")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "vlm"}, "Policy.inference.kind='vlm'; choose one of ['in_process', 'server', "
                      "'vllm', 'sglang'] (or omit it)"),
    ({"transport": "shm"}, "Policy.inference: kind='in_process' cannot use transport='shm'; "
                           "choose one of ['tensors', 'disk'] (or omit it)"),
    ({"kind": "vllm", "transport": "shm"}, "Policy.inference: kind='vllm' cannot use "
                                           "transport='shm'; choose one of ['disk', 'nccl'] "
                                           "(or omit it)"),
    ({"kind": "vllm", "transport": "nccl", "device": "cpu"},
     "Policy.inference: transport='nccl' needs device='cuda'; use one of ['disk'] on CPU"),
    ({"kind": "server", "transport": "nccl"},
     "Policy.inference: kind='server' cannot use transport='nccl'; choose one of ['shm', "
     "'disk', 'gloo'] (or omit it)"),
    ({"python": "/venv/bin/python"}, "Policy.inference: urls, server_args and python are for "
                                     "kind='server', 'vllm' or 'sglang', not 'in_process'"),
    ({"kind": "server", "replicas": 0}, "Policy.inference.replicas must be an integer >= 1, got 0"),
])
def test_invalid_inference(kwargs, message):
    with pytest.raises(ConfigError) as info:
        InferencePlacement(**kwargs)
    assert str(info.value) == message


def test_placements_are_frozen():
    with pytest.raises(AttributeError):
        TrainPlacement().world_size = 2  # type: ignore[misc]


# ---- YAML -------------------------------------------------------------------------------------

def _run(policy: dict) -> dict:
    return {"env": "Signaling-v0", "policies": {"a": policy}, "policy_map": {"speaker": "a"}}


def test_yaml_spelling_round_trips_to_policy():
    cfg = parse_config(_run({"backend": "archon", "train": {"world_size": 2, "tp": 2},
                             "inference": "vllm"}))
    policy = Policy(**cfg.policies["a"].model_dump())
    assert policy.train == TrainPlacement(world_size=2, tp=2)
    assert policy.inference == InferencePlacement(kind="vllm")
    assert PolicyConfig().train == Policy().train


@pytest.mark.parametrize(("policy", "message"), [
    ({"train": {"world_size": 2, "tp": 2}},
     "policies.a: Value error, Policy.train: fsdp supports only data parallelism (dp); use "
     "backend='archon' for tp=2"),
    ({"train": {"wrld_size": 2}},
     "policies.a.train: Value error, Policy.train: unknown field(s) ['wrld_size']; known: "
     "['cpus', 'device', 'dp', 'ep', 'pp', 'threads', 'tp', 'workers', 'world_size']"),
    ({"inference": "vlm"},
     "policies.a.inference: Value error, Policy.inference.kind='vlm'; choose one of "
     "['in_process', 'server', 'vllm', 'sglang'] (or omit it)"),
])
def test_yaml_errors_name_the_field(policy, message):
    with pytest.raises(ConfigError) as info:
        parse_config(_run(policy))
    assert str(info.value) == f"invalid config:\n  {message}"
