"""Gateway hardening: a served gateway's memory stays flat over 5,000 ended sessions
(issue 14: +7 MB per 500 sessions before, as /end never dropped them)."""

from __future__ import annotations

import gc
from pathlib import Path

import httpx2
import pytest

from areal_agents.gateway import Gateway
from areal_agents.testing.engine import ScriptedEngine

STATUS = Path("/proc/self/status")
MESSAGE = [{"role": "user", "content": "count the apples in this basket " * 10}]


def rss_mb() -> float:
    """This process's resident set size in MB (Linux)."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def episodes(http: httpx2.AsyncClient, engine: ScriptedEngine, count: int) -> None:
    """``count`` sessions, each: open, one chat turn, a reward, end (all over HTTP)."""
    for _ in range(count):
        engine.requests.clear()  # the fake engine's own log of requests is not the gateway's
        r = await http.post("/rl/sessions", json={"policy": "tiny"})
        sid, key = r.json()["session_id"], r.json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        r = await http.post("/v1/chat/completions", headers=auth,
                            json={"model": "tiny", "messages": MESSAGE, "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert (await http.post(f"/rl/sessions/{sid}/reward", headers=auth,
                                json={"reward": 1.0})).status_code == 200
        assert (await http.post(f"/rl/sessions/{sid}/end", headers=auth)).status_code == 200


@pytest.mark.slow
@pytest.mark.skipif(not STATUS.exists(), reason="reads RSS from /proc (Linux)")
async def test_rss_stays_flat_over_5000_sessions(tok):
    gw = Gateway(admin_key="k")
    engine = ScriptedEngine(["fine"], tokenizer=tok)
    gw.add_policy("tiny", [engine], tok)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app),
                                  base_url="http://gateway",
                                  headers={"Authorization": "Bearer k"}) as http:
        await episodes(http, engine, 500)  # warm-up: caches, allocator arenas, tokenizer threads
        gc.collect()
        start = rss_mb()
        await episodes(http, engine, 500)
        gc.collect()
        first = rss_mb() - start  # what one batch of 500 adds
        await episodes(http, engine, 4000)
        gc.collect()
        rest = rss_mb() - start - first
    # flat: the next 4,000 sessions add no more than 4 MB, nor twice what the first 500 did
    # (a leak of the first batch's size per 500 would add 8x that)
    assert rest <= max(4.0, 2 * first), (first, rest)
    assert gw._sessions == {} and gw._session_by_digest == {}
    assert gw.ledger.to_dict() == {"opened": 5000, "ended": 5000, "abandoned": 0,
                                   "expired": 0}
    assert len(gw._ended) == 4096  # the bounded memory of ended ids, full
    await gw.close()
