"""The launcher with functions defined inside a test (closures, local classes: what a notebook
cell defines) on 2 gloo ranks, and workers that exit when their controller is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from areal_agents.errors import TrainError
from areal_agents.trainers.launcher import DistributedEngineGroup, launch


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_launch_runs_a_closure_on_two_gloo_ranks() -> None:
    scale = 3.0  # captured: the function cannot be pickled by reference

    def summed_rank() -> tuple[int, float]:
        t = torch.tensor([scale * (dist.get_rank() + 1)])
        dist.all_reduce(t)
        return dist.get_rank(), float(t)

    assert launch(2, summed_rank) == [(0, 9.0), (1, 9.0)]


def test_engine_group_with_a_local_factory_and_a_local_method_argument() -> None:
    class Counter:  # a class defined in a function, as in a notebook cell
        def __init__(self, start: int) -> None:
            self.value = torch.tensor([float(start + dist.get_rank())])

        def apply(self, fn):
            self.value = fn(self.value)
            dist.all_reduce(self.value)
            return self.value.clone()

    offset = 10.0
    with DistributedEngineGroup(2, Counter, 1, device="cpu", start_timeout=300) as group:
        got = group.call("apply", lambda t: t + offset)  # a lambda argument crosses too
    # ranks hold 1 and 2; +10 each; all_reduce sums: 11 + 12
    assert [float(t) for t in got] == [23.0, 23.0]


_CONTROLLER = textwrap.dedent("""
    import sys, time
    from areal_agents.trainers.launcher import DistributedEngineGroup

    class Busy:
        def ping(self):
            return "pong"

        def block(self):
            time.sleep(600)  # busy ranks: they never read the closed pipe

    group = DistributedEngineGroup(2, Busy, device="cpu", start_timeout=300)
    assert group.ping() == "pong"
    print(*(p.pid for p in group._procs), flush=True)
    group.block()
""")


def test_workers_exit_when_the_controller_is_killed() -> None:
    """A kernel restart is a SIGKILL of the controller: its ranks, busy in a call, must not
    linger."""
    controller = subprocess.Popen([sys.executable, "-c", _CONTROLLER], stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = controller.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, f"controller printed {line!r}"
        assert all(_alive(p) for p in pids)
        os.kill(controller.pid, signal.SIGKILL)
        controller.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if _alive(p)], "worker ranks outlived their controller"
    finally:
        if controller.poll() is None:
            controller.kill()


def test_a_failing_closure_reports_the_rank_traceback() -> None:
    message = "closure failed on purpose"

    def fail() -> None:
        raise RuntimeError(message)

    with pytest.raises(TrainError, match="closure failed on purpose"):
        launch(2, fail)


_UNGUARDED = textwrap.dedent("""
    from areal_agents.trainers.launcher import DistributedEngineGroup, launch

    class Holder:
        def __init__(self, blob):
            self.size = len(blob)

    blob = b"x" * 2**20  # a payload far larger than a pipe's buffer
    if "{api}" == "group":
        DistributedEngineGroup(1, Holder, blob, device="cpu", start_timeout=120)
    else:
        launch(1, len, blob, timeout=120)
""")


@pytest.mark.slow
@pytest.mark.parametrize("api", ["group", "launch"])
def test_a_script_without_a_main_guard_fails_fast_naming_the_guard(tmp_path, api) -> None:
    """Spawned workers import the main module: a script that starts workers at import time
    makes each worker die while starting. That is a clear error naming the fix, not a
    controller blocked for ever on the large payload it writes to the dead worker."""
    script = tmp_path / "train.py"
    script.write_text(_UNGUARDED.replace("{api}", api))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "TrainError" in done.stderr
    assert 'put the training under `if __name__ == "__main__":`' in done.stderr
