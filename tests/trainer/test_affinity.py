"""CPU affinity: ``Policy.train.cpus`` pins train worker processes (read back from the
workers), the trainer's ``cpus`` pins the controller, and CPU ids the host lacks are refused."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from fsdp._helpers import make_model

from areal_agents.errors import ConfigError
from areal_agents.trainers.affinity import available_cpus, check_cpus, pin_process
from areal_agents.trainers.launcher import DistributedEngineGroup
from areal_agents.trainers.placement import TrainPlacement
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer
from areal_agents.trainers.worker_group import WorkerGroupEngine

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux CPU affinity and at least 2 usable CPUs")

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]


def _threads_affinity(pid: int | str = "self") -> set[frozenset[int]]:
    """The distinct CPU sets of every thread of process ``pid`` (Linux ``/proc``)."""
    return {frozenset(os.sched_getaffinity(int(t.name)))
            for t in Path(f"/proc/{pid}/task").iterdir()}


class _Probe:
    """A worker rank's engine that reports its own process's affinity and torch threads."""

    def report(self) -> tuple[set[frozenset[int]], int]:
        return _threads_affinity(), torch.get_num_threads()


def _children() -> list[int]:
    return [int(pid) for children in Path("/proc/self/task").glob("*/children")
            for pid in children.read_text().split()]


@pytest.mark.multiprocess
def test_each_rank_is_pinned_to_its_own_cpus_with_threads_capped():
    per_rank = [(CPUS[0],), (CPUS[1],)]
    with DistributedEngineGroup(2, _Probe, threads=4, device="cpu", cpus=per_rank) as group:
        reports = group.call("report")
    assert reports == [({frozenset({CPUS[0]})}, 1), ({frozenset({CPUS[1]})}, 1)]


@pytest.mark.multiprocess
def test_an_unpinned_rank_keeps_the_controllers_cpus():
    with DistributedEngineGroup(1, _Probe, threads=2, device="cpu", cpus=[None]) as group:
        (report,) = group.call("report")
    assert report == ({frozenset(CPUS)}, 2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("controller_pinned", [False, True])
def test_a_train_worker_runs_on_the_cpus_its_placement_names(controller_pinned):
    """Also when the controller was pinned elsewhere first (the worker inherits that set at
    birth and must widen out of it)."""
    original, threads = os.sched_getaffinity(0), torch.get_num_threads()
    before = set(_children())
    engine = None
    try:
        if controller_pinned:
            pin_process([CPUS[0]])
        engine = WorkerGroupEngine(make_model(), TrainPlacement(workers=True, cpus=[CPUS[-1]]),
                                   lr=1e-3)
        (worker,) = set(_children()) - before
        assert _threads_affinity(worker) == {frozenset({CPUS[-1]})}
    finally:
        if engine is not None:
            engine.close()
        pin_process(original)
        torch.set_num_threads(threads)


def test_pin_process_pins_threads_started_before_it_and_sets_torch_threads():
    original, threads = os.sched_getaffinity(0), torch.get_num_threads()
    started, stop = threading.Event(), threading.Event()
    native: list[int] = []

    def idle() -> None:
        native.append(threading.get_native_id())
        started.set()
        stop.wait()

    thread = threading.Thread(target=idle)
    thread.start()
    started.wait()
    try:
        assert pin_process([CPUS[0]], threads=8) == 1
        assert torch.get_num_threads() == 1
        assert os.sched_getaffinity(native[0]) == {CPUS[0]}
        assert _threads_affinity() == {frozenset({CPUS[0]})}
    finally:
        stop.set()
        thread.join()
        pin_process(original)  # every thread back on the CPUs it had
        torch.set_num_threads(threads)


def test_cpu_ids_the_host_lacks_are_refused_naming_the_available_ones():
    missing = max(available_cpus()) + 1
    message = (f"Policy.train.cpus: CPU id(s) [{missing}] are not available on this host; "
               f"available: {sorted(available_cpus())}")
    with pytest.raises(ConfigError) as info:
        TrainPlacement(workers=True, cpus=[CPUS[0], missing])
    assert str(info.value) == message
    with pytest.raises(ConfigError, match=r"Policy.train.cpus\[1\]: CPU id\(s\) \["):
        TrainPlacement(world_size=2, cpus=[[CPUS[0]], [missing]])
    with pytest.raises(ConfigError, match=r"^cpus: CPU id\(s\) "):
        Trainer(env="Arithmetic-v0", policies={"p": Policy(model="tiny:xs")},
                policy_map={"agent": "p"}, batch_size=4, group_size=2, cpus=[missing])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"workers": True, "cpus": []}, "an empty CPU list"),
    ({"workers": True, "cpus": [-1]}, r"integers >= 0, got \[-1\]"),
    ({"workers": True, "cpus": "0"}, "must be a list of CPU ids"),
    ({"world_size": 2, "cpus": [[0]]}, "1 per-rank CPU lists for world_size=2"),
    ({"cpus": [0]}, "trains in the controller's process; set workers=True"),
])
def test_bad_cpus_fields_name_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainPlacement(**kwargs)


def test_flat_and_per_rank_cpus_resolve_per_rank():
    flat = TrainPlacement(world_size=2, cpus=[CPUS[1], CPUS[0], CPUS[1]])
    assert [flat.rank_cpus(r) for r in range(2)] == [tuple(CPUS[:2])] * 2
    per_rank = TrainPlacement.of({"world_size": 2, "cpus": [[CPUS[1]], [CPUS[0]]]})
    assert [per_rank.rank_cpus(r) for r in range(2)] == [(CPUS[1],), (CPUS[0],)]
    assert TrainPlacement(workers=True).rank_cpus(0) is None
    assert check_cpus("x", iter([CPUS[0]])) == (CPUS[0],)
    assert set(CPUS) <= available_cpus()
