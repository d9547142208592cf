"""``RayLauncher(address=...)`` from Python joins a running cluster: a head started here with
``ray start --head --block`` (its own temp dir, so no other Ray user on this host sees it),
reached with ``address="auto"`` (``RAY_ADDRESS`` names the head, as on a cluster node) or with
the head's address. ``close`` leaves that cluster running (it was not started here)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from areal_agents.engines.server_process import free_port  # noqa: E402
from areal_agents.trainers.placement import TrainPlacement  # noqa: E402
from areal_agents.trainers.ray_launcher import RayLauncher  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray head starts (~10-20 s on 2 busy cores)

START_S = 180  # bound on the head's start-up (a loaded 2-core host)


@pytest.fixture(scope="module")
def head() -> Any:
    """A one-node cluster (1 CPU, 2 logical GPUs) at ``127.0.0.1:port``; stopped at the end."""
    if ray.is_initialized():
        ray.shutdown()
    ray_cli = str(Path(sys.executable).parent / "ray")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths live here
    with open(Path(temp) / "head.log", "w") as log:
        proc = subprocess.Popen(
            [ray_cli, "start", "--head", "--block",
             f"--port={port}", "--num-cpus=1", "--num-gpus=2", f"--temp-dir={temp}",
             "--include-dashboard=false", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"})  # a driver then needs no token
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while not _listening(port):
            assert proc.poll() is None, (Path(temp) / "head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not start in time"
            time.sleep(0.5)
        yield address, proc
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)  # --block stops the head's processes on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _joins_the_head(launcher: RayLauncher, address: str, proc: Any) -> None:
    """The launcher places a training group on the head's cluster, and leaves it running."""
    try:
        factory = launcher.group_factory("speaker", TrainPlacement(world_size=2, device="cpu"))
        # the head (Ray names it by this host's address), not a new instance
        assert ray.get_runtime_context().gcs_address.rsplit(":")[-1] == address.rsplit(":")[-1]
        assert ray.cluster_resources()["GPU"] == 2.0  # the head's resources
        table = ray.util.placement_group_table(factory.keywords["placement_group"])
        assert (table["strategy"], list(table["bundles"].values()), table["state"]) == (
            "STRICT_PACK", [{"CPU": 0.5}] * 2, "CREATED")
        assert ray.get_runtime_context().namespace == launcher.namespace
    finally:
        asyncio.run(launcher.close())
    assert not launcher._started and ray.is_initialized()  # joined, so not stopped here
    assert proc.poll() is None and ray.cluster_resources()["CPU"] == 1.0  # the head runs on
    ray.shutdown()


def test_python_api_address_auto_joins_the_running_cluster(head, monkeypatch):
    address, proc = head
    monkeypatch.setenv("RAY_ADDRESS", address)  # what "auto" finds first on a cluster node
    _joins_the_head(RayLauncher(address="auto", cpus_per_worker=0.5), address, proc)


def test_python_api_head_address_joins_the_running_cluster(head, monkeypatch):
    address, proc = head
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _joins_the_head(RayLauncher(address=address, cpus_per_worker=0.5), address, proc)
