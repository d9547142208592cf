"""Sessions over HTTP: creation, recording, rewards, isolation, end; admin routes."""

from __future__ import annotations

import openai
import pytest

from areal_agents.engines.base import WeightUpdate

MSGS = [{"role": "user", "content": "hi"}]


async def open_session(served, policy="tiny"):
    async with served.http() as http:
        r = await http.post("/rl/sessions", json={"policy": policy, "metadata": {"ep": 1}})
    assert r.status_code == 200, r.text
    return r.json()["session_id"], r.json()["api_key"]


async def test_session_records_turns_and_rewards(served, tok):
    sid, key = await open_session(served)
    assert key != served.gw.admin_key and sid not in key
    r = await served.async_client(key).chat.completions.create(model="tiny", messages=MSGS)
    async with served.http(key) as http:
        assert (await http.post(f"/rl/sessions/{sid}/reward", json={"reward": 1.5})).status_code \
            == 200
        got = (await http.get(f"/rl/sessions/{sid}")).json()
    assert got["metadata"] == {"ep": 1} and got["rewards"] == [1.5]
    (turn,) = got["turns"]
    assert turn["prompt_ids"] == r.model_extra["prompt_token_ids"]
    assert turn["completion_ids"] == r.choices[0].model_extra["token_ids"]
    assert turn["versions"] == [0] * len(turn["completion_ids"])
    assert turn["messages"] == MSGS
    assert turn["reply"]["content"] == "hello world"
    assert served.gw.session(key).session_id == sid


async def test_admin_calls_are_not_recorded(served):
    sid, _ = await open_session(served)
    await served.async_client(served.gw.admin_key).chat.completions.create(model="tiny", messages=MSGS)
    assert served.gw.session(sid).turns == []


async def test_session_isolation(served):
    sid_a, key_a = await open_session(served)
    sid_b, key_b = await open_session(served)
    async with served.http(key_b) as http:
        assert (await http.get(f"/rl/sessions/{sid_b}")).status_code == 200
    async with served.http(key_a) as http:
        assert (await http.get(f"/rl/sessions/{sid_b}")).status_code == 403
        assert (await http.post(f"/rl/sessions/{sid_b}/reward",
                                json={"reward": 9})).status_code == 403
        assert (await http.post(f"/rl/sessions/{sid_b}/end")).status_code == 403
        r = await http.post("/rl/sessions", json={"policy": "tiny"})
        assert r.status_code == 403  # session keys cannot open sessions
        r = await http.post("/admin/pause", json={})
        assert r.status_code == 403
    assert served.gw.session(sid_b).rewards == [] and not served.gw.session(sid_b).ended
    async with served.http("bogus") as http:
        assert (await http.get(f"/rl/sessions/{sid_a}")).status_code == 401
    async with served.http(None) as http:
        assert (await http.post("/rl/sessions", json={"policy": "tiny"})).status_code == 401


async def test_ended_session_rejects_completions(served):
    sid, key = await open_session(served)
    async with served.http(key) as http:
        assert (await http.post(f"/rl/sessions/{sid}/end")).json()["ended"] is True
    with pytest.raises(openai.ConflictError):
        await served.async_client(key).chat.completions.create(model="tiny", messages=MSGS)


async def test_unknown_policy_session_is_404(served):
    async with served.http() as http:
        r = await http.post("/rl/sessions", json={"policy": "nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await http.get("/rl/sessions/sess_missing")
        assert r.status_code == 404


async def test_admin_pause_resume_update(served, tmp_path):
    async with served.http() as http:
        assert (await http.post("/admin/pause", json={"policy": "tiny"})).status_code == 200
        assert not served.engine._running.is_set()
        assert (await http.post("/admin/resume")).status_code == 200
        assert served.engine._running.is_set()
        r = await http.post("/admin/update_weights", json={"policy": "tiny",
                                                           "path": str(tmp_path)})
        assert r.json()["versions"] == [1]
        r = await http.post("/admin/update_weights", json={"policy": "x", "path": "p"})
        assert r.status_code == 404


async def test_in_process_api(tok):
    from areal_agents.gateway import Gateway
    from areal_agents.testing.engine import ScriptedEngine

    gw = Gateway()
    assert len(gw.admin_key) > 30  # random, never a default
    engines = [ScriptedEngine(["ok"], tokenizer=tok) for _ in range(2)]
    gw.add_policy("p", engines, tok)
    key = await gw.create_session("p", {"a": 1})
    r = await gw.async_client(key).chat.completions.create(model="p", messages=MSGS)
    assert r.choices[0].message.content == "ok"
    assert len(gw.session(key).turns) == 1
    await gw.update_weights("p", WeightUpdate(named_tensors=[]))
    assert [e.version for e in engines] == [1, 1]
    await gw.pause("p")
    assert not any(e._running.is_set() for e in engines)
    await gw.resume()
    with pytest.raises(KeyError):
        await gw.create_session("missing")
    with pytest.raises(ValueError, match="already registered"):
        gw.add_policy("p", engines, tok)


async def test_pause_holds_requests_until_resume(tok):
    import asyncio

    from areal_agents.gateway import Gateway
    from areal_agents.testing.engine import ScriptedEngine

    gw = Gateway()
    engine = ScriptedEngine(["ok"], tokenizer=tok)
    gw.add_policy("p", [engine], tok)
    await gw.pause("p")
    task = asyncio.create_task(gw.async_client().chat.completions.create(
        model="p", messages=MSGS))
    for _ in range(50):
        await asyncio.sleep(0.01)
    assert not task.done() and engine.num_pending == 1
    await gw.resume("p")
    assert (await task).choices[0].message.content == "ok"


async def test_sessions_stick_to_one_replica(tok):
    from areal_agents.gateway import Gateway
    from areal_agents.testing.engine import ScriptedEngine

    gw = Gateway()
    engines = [ScriptedEngine(["ok"], tokenizer=tok) for _ in range(2)]
    gw.add_policy("p", engines, tok)
    keys = [await gw.create_session("p") for _ in range(2)]
    for _ in range(3):
        for key in keys:
            await gw.async_client(key).chat.completions.create(model="p", messages=MSGS)
    by_engine = [{r.session_id for r in e.requests} for e in engines]
    assert all(len(ids) == 1 for ids in by_engine)  # each replica served exactly one session
    assert by_engine[0] != by_engine[1]
    assert [len(e.requests) for e in engines] == [3, 3]


async def test_end_session_drop_forgets_key(tok):
    from areal_agents.gateway import Gateway
    from areal_agents.testing.engine import ScriptedEngine

    gw = Gateway()
    gw.add_policy("p", [ScriptedEngine(["ok"], tokenizer=tok)], tok)
    key = await gw.create_session("p")
    await gw.async_client(key).chat.completions.create(model="p", messages=MSGS)
    session = gw.end_session(key, drop=True)
    assert session.ended and len(session.turns) == 1
    with pytest.raises(KeyError):
        gw.session(key)
    with pytest.raises(openai.AuthenticationError):
        await gw.async_client(key).chat.completions.create(model="p", messages=MSGS)
    assert gw.policies["p"].router._sticky == {}
    key2 = await gw.create_session("p")
    await gw.async_client(key2).chat.completions.create(model="p", messages=MSGS)
    assert len(gw.policies["p"].router._sticky) == 1
    gw.session(key2).end()  # ending the Session object directly also releases stickiness
    assert gw.policies["p"].router._sticky == {}
