"""Sessions an agent never ends expire after ``session_idle_timeout_s`` without a request:
counted abandoned by the trainer's source, their keys revoked; any request (or a refresh)
keeps a session alive. Time is an injected clock: no sleeps."""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest

from areal_agents.config import load_config
from areal_agents.errors import ConfigError
from areal_agents.gateway import Gateway
from areal_agents.models import tiny_tokenizer
from areal_agents.rollout.staleness import StalenessControl
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.external import ExternalEpisodes, ExternalTrainer

CONFIG = Path(__file__).resolve().parents[2] / "examples/proxy/train.yaml"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served():
    tok = tiny_tokenizer()
    src = ExternalEpisodes({"p": StalenessControl(4, 0, 8)}, group_size=2)
    clock = Clock()
    gw = Gateway(admin_key="k", session_gate=src.admit, session_sink=src.on_session_end,
                 session_idle_timeout_s=30.0, clock=clock)
    gw.add_policy("p", [ScriptedEngine(lambda request, index: "4", tokenizer=tok)], tok)
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app), base_url="http://gw")
    return gw, src, clock, http


async def _open(http: httpx2.AsyncClient, task: str) -> tuple[str, dict[str, str]]:
    r = await http.post("/rl/sessions", json={"policy": "p", "task_id": task},
                        headers={"Authorization": "Bearer k"})
    assert r.status_code == 200, r.text
    return r.json()["session_id"], {"Authorization": f"Bearer {r.json()['api_key']}"}


async def _chat(http: httpx2.AsyncClient, auth: dict[str, str]) -> httpx2.Response:
    return await http.post("/v1/chat/completions", headers=auth, json={
        "model": "p", "messages": [{"role": "user", "content": "2 + 2 ="}]})


async def test_an_idle_session_expires_is_counted_abandoned_and_its_key_is_revoked(served):
    gw, src, clock, http = served
    idle_id, idle = await _open(http, "t")
    busy_id, busy = await _open(http, "t")
    assert (await _chat(http, idle)).status_code == 200
    clock.now += 20
    assert (await _chat(http, busy)).status_code == 200  # busy is active at 120
    clock.now += 11  # idle: 31 s since its last request; busy: 11 s
    r = await _chat(http, idle)
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_ended", r.text
    assert gw.ledger.expired == 1 and idle_id not in gw._sessions and busy_id in gw._sessions
    assert src.ledger["p"] == {"abandoned": 1} and src.controls["p"].running == 1
    await http.post(f"/rl/sessions/{busy_id}/reward", headers=busy, json={"reward": 1.0})
    assert (await http.post(f"/rl/sessions/{busy_id}/end", headers=busy)).status_code == 200
    [group] = await src.take("p", 1)  # the group of "t": the busy session, trained
    assert [s.reward for s in group.samples] == [1.0]
    assert src.ledger["p"] == {"abandoned": 1, "trained": 1}
    assert src.controls["p"].submitted == sum(src.ledger["p"].values())
    await http.aclose()
    await gw.close()


async def test_refresh_and_any_request_keep_a_session_alive(served):
    gw, src, clock, http = served
    sid, auth = await _open(http, "a")
    for _ in range(3):  # a request every 25 s: never 30 s idle
        clock.now += 25
        assert (await http.get(f"/rl/sessions/{sid}", headers=auth)).status_code == 200
    clock.now += 25
    r = await http.post(f"/rl/sessions/{sid}/refresh", headers=auth, json={"task_id": "b"})
    assert r.status_code == 200, r.text
    new_id = r.json()["session_id"]
    clock.now += 25  # 50 s after the previous session's last request, 25 s after the refresh
    assert (await _chat(http, auth)).status_code == 200
    assert gw.ledger.expired == 0 and new_id in gw._sessions
    clock.now += 31
    assert gw.expire_idle_sessions() == [new_id]
    assert (await _chat(http, auth)).status_code == 409
    assert src.ledger["p"] == {"failed:unrewarded": 1, "abandoned": 1}
    await http.aclose()
    await gw.close()


def test_the_timeout_is_a_yaml_field_and_must_be_positive():
    cfg = load_config(str(CONFIG), ["trainer.session_idle_timeout_s=45"])
    assert cfg.trainer.session_idle_timeout_s == 45.0
    with pytest.raises(ConfigError, match="session_idle_timeout_s"):
        load_config(str(CONFIG), ["trainer.session_idle_timeout_s=0"])
    with pytest.raises(ValueError, match="session_idle_timeout_s must be > 0"):
        Gateway(session_idle_timeout_s=0)
    assert Gateway().expire_idle_sessions() == []  # no timeout: nothing expires
    assert ExternalTrainer.__init__.__kwdefaults__["session_idle_timeout_s"] is None
