"""``serve --train``: sessions of external agents become grouped training samples; admission
answers 429 + Retry-After without capacity; the proxy helper ends sessions on exceptions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from areal_agents.engines.local import LocalEngine
from areal_agents.gateway import Gateway
from areal_agents.gateway.server import ServerThread, free_port
from areal_agents.gateway.sessions import Session, Turn
from areal_agents.models import tiny
from areal_agents.proxy import episode
from areal_agents.rollout.staleness import StalenessControl
from areal_agents.trainers.external import ExternalEpisodes

ROOT = Path(__file__).resolve().parents[2]


def _ended(task: str, reward: float | None, version: int = 0) -> Session:
    s = Session(policy="p", metadata={"task_id": task, "role": "solver",
                                      "admitted_version": version})
    s.record(Turn(prompt_ids=[1, 2], completion_ids=[3, 4], logprobs=[-0.5, -0.25],
                  versions=[version, version], messages=None, reply=None, tools=None,
                  finish_reason="stop", request_id="cmpl-1"))
    if reward is not None:
        s.add_reward(reward)
    s.end()
    return s


def _source(batch_size: int = 2, group_size: int = 2) -> ExternalEpisodes:
    return ExternalEpisodes({"p": StalenessControl(batch_size, 0, 8)}, group_size=group_size)


async def test_sessions_group_by_task_id_and_the_ledger_adds_up():
    src = _source(batch_size=2, group_size=2)
    assert [src.admit("p", {}) for _ in range(3)] == [None, None, 1.0]  # no capacity: 429
    assert src.admit("frozen", {}) is None  # not trained here: always admitted
    src.on_session_end(_ended("a", 1.0))
    assert src.buffered("p") == 0 and src.pending  # waiting for the rest of group "a"
    src.on_session_end(_ended("a", 0.0))
    groups = await src.take("p", 2)
    assert [(g.meta["task_id"], g.num_episodes) for g in groups] == [("a", 2)]
    samples = groups[0].samples
    assert [(s.group, s.agent, s.reward) for s in samples] == [("a", "solver", 1.0),
                                                               ("a", "solver", 0.0)]
    assert samples[0].token_ids == [1, 2, 3, 4] and samples[0].loss_mask == [0, 0, 1, 1]

    async def push() -> None:
        assert src.admit("p", {}) == 1.0  # paused while the weights update

    await src.update_weights("p", push, 1)
    assert src.admit("p", {}) is None and src.admit("p", {}) is None
    src.on_session_end(_ended("b", None, version=1))  # ended unrewarded (the agent raised)
    src.on_session_end(_ended("b", 1.0, version=1))
    c = src.controls["p"]
    assert src.ledger["p"] == {"trained": 2, "failed:unrewarded": 1}
    assert src.buffered("p") == 1 and src.unresolved("p") == 1
    await src.stop()
    assert src.ledger["p"] == {"trained": 2, "failed:unrewarded": 1, "abandoned": 1}
    assert c.submitted == sum(src.ledger["p"].values()) == 4
    assert src.admit("p", {}) == 1.0  # stopped: refused


@pytest.fixture
def served():
    model, tok = tiny("xs", seed=0)
    src = _source(batch_size=1, group_size=1)
    gw = Gateway(admin_key="k", session_gate=src.admit, session_sink=src.on_session_end)
    gw.add_policy("p", [LocalEngine(model, tok, max_batch_size=4)], tok)
    with ServerThread(gw.app, port=free_port()) as server:
        yield server.url, src


def test_opening_without_capacity_answers_429_with_retry_after(served):
    url, src = served
    with httpx2.Client(base_url=url, headers={"Authorization": "Bearer k"}) as http:
        first = http.post("/rl/sessions", json={"policy": "p", "task_id": 7, "role": "solver"})
        assert first.status_code == 200
        second = http.post("/rl/sessions", json={"policy": "p"})
        bad = http.post("/rl/sessions", json={"policy": "p", "task_id": [1]})
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert src.controls["p"].submitted == 1  # the refused session took no slot
    assert second.json()["error"]["code"] == "no_capacity"
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "'task_id' must be a string or an integer, got [1]"


async def test_proxy_episode_ends_the_session_when_the_agent_raises(served):
    url, src = served
    with pytest.raises(RuntimeError, match="agent bug"):
        async with episode(url, "p", task_id="t", key="k") as ep:
            await ep.client.chat.completions.create(
                model="p", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            raise RuntimeError("agent bug")
    assert src.ledger["p"] == {"failed:unrewarded": 1}
    async with episode(url, "p", task_id="t", key="k") as ep:  # its slot was freed
        await ep.client.chat.completions.create(
            model="p", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        await ep.reward(0.5)
        assert await ep.versions() == [0, 0]
    assert src.buffered("p") == 1


@pytest.mark.slow
def test_external_agent_process_trains_through_serve_train(tmp_path):
    """A separate agent process (openai SDK + proxy helper) drives 2 train steps."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "areal_agents.cli", "serve", "--train",
         str(ROOT / "examples/proxy/train.yaml"), "trainer.steps=2", "trainer.batch_size=4",
         "trainer.group_size=2", f"run_dir={tmp_path}", "--port", str(port),
         "--admin-key", "k"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.5)
        agent = subprocess.run(
            [sys.executable, str(ROOT / "examples/proxy/arithmetic_agent.py"), "--url",
             f"http://127.0.0.1:{port}", "--key", "k", "--group-size", "2"],
            capture_output=True, text=True, env=env, timeout=600)
        out, err = server.communicate(timeout=120)
    finally:
        server.kill()
    assert agent.returncode == 0, agent.stderr
    assert server.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    counts, ledger = summary["counts"]["solver"], summary["ledger"]["solver"]
    assert summary["steps"] == 2 and counts["version"] == 2
    assert ledger["trained"] == 8
    assert counts["submitted"] == sum(ledger.values())  # opened = trained+filtered+failed+...
    episodes = [json.loads(line) for line in agent.stdout.splitlines() if "task_id" in line]
    versions = [max(e["versions"]) for e in episodes]
    assert versions[0] == 0 and max(versions) >= 1  # later sessions see the pushed weights
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "step" in m][-2:] == [1, 2]


def test_proxy_is_reachable_from_the_flat_api():
    import areal_agents as aa

    assert aa.proxy.episode is episode


def test_serve_train_refuses_other_hosts_without_a_chosen_key(capsys, monkeypatch):
    from areal_agents.cli import main

    monkeypatch.delenv("AREAL_AGENTS_ADMIN_KEY", raising=False)
    assert main(["serve", "--train", str(ROOT / "examples/proxy/train.yaml"),
                 "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err == (
        "error: serving on 0.0.0.0 (not loopback) needs a chosen admin key: pass --admin-key "
        "or set $AREAL_AGENTS_ADMIN_KEY\n")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == "error: serve needs --model (or --train CONFIG)\n"


async def test_a_session_that_cannot_become_samples_is_counted_and_frees_its_slot(caplog):
    src = _source(batch_size=1, group_size=1)
    assert src.admit("p", {}) is None and src.admit("p", {}) == 1.0
    broken = _ended("a", 1.0)
    broken.turns[0].logprobs = []  # misaligned: the tokenization contract refuses it
    src.on_session_end(broken)
    assert src.ledger["p"] == {"failed:samples_error": 1}
    assert src.admit("p", {}) is None  # its slot is free again
    assert "could not become samples" in caplog.text
