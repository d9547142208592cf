"""The three recipes of ``docs/debugging.md`` run as written there: serve only the LLM and
drive an env by hand; mock data + torchrun on gloo; training-free ``areal-agents eval``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from areal_agents.cli import main
from areal_agents.trainers.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]
DEBUGGING = ROOT / "examples" / "debugging"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_the_guide_names_the_scripts_and_commands_tested_here() -> None:
    guide = (ROOT / "docs" / "debugging.md").read_text()
    for needle in ("areal-agents serve --model tiny:xs --policy chat",
                   "examples/debugging/drive_env.py", "--episodes 32",
                   "torchrun --nproc-per-node 2 examples/debugging/mock_loss_torchrun.py",
                   "areal-agents eval examples/debugging/eval_signaling.yaml"):
        assert needle in guide
    for link in re.findall(r"\]\((\.\./examples/debugging/[^)]+)\)", guide):
        assert (ROOT / "docs" / link).resolve().exists(), link


@pytest.mark.slow
def test_serve_only_the_llm_and_drive_an_env_by_hand() -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "areal_agents.cli", "serve", "--model", "tiny:xs", "--policy",
         "chat", "--port", str(port), "--admin-key", "secret"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                time.sleep(0.5)
        out = subprocess.run(
            [sys.executable, str(DEBUGGING / "drive_env.py"), "--base-url",
             f"http://127.0.0.1:{port}/v1", "--api-key", "secret", "--model", "chat",
             "--episodes", "3"],
            env=ENV, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "speaker |      user: 'Items:" in out.stdout
        assert "listener | assistant:" in out.stdout
        assert out.stdout.count("status: terminated returns: {'speaker':") == 3
        # the training-free evaluation of the endpoint: Signaling's reward is shared
        mean = re.search(r"mean returns over 3 episodes \(seeds 0-2\): \{'speaker': ([\d.]+), "
                         r"'listener': ([\d.]+)\}", out.stdout)
        assert mean and mean[1] == mean[2], out.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_mock_data_and_torchrun_on_two_gloo_ranks(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(DEBUGGING / "mock_loss_torchrun.py"), "--steps", "2", "--out", str(report)],
        env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(report.read_text())
    assert got["world_size"] == 2 and len(got["losses"]) == 2
    assert all(l > 0 for l in got["losses"])  # noqa: E741
    a, b = got["checksums"]
    assert a == b  # data parallel: the ranks' weights stayed identical


def test_training_free_eval_of_a_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(DEBUGGING / "eval_signaling.yaml")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["eval/speaker/success"] <= 1.0
    assert metrics["eval/speaker/success"] == metrics["eval/listener/success"]  # shared reward
