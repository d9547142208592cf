"""``POST /rl/sessions/{id}/refresh``: a long-lived agent ends its episode and continues in a
new session under the same key; a refused next session answers 429 and the retry opens it."""

from __future__ import annotations

import httpx2

from areal_agents.gateway import Gateway
from areal_agents.rollout.staleness import StalenessControl
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.external import ExternalEpisodes

CHAT = {"model": "p", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_refresh_keeps_the_key_and_hands_each_episode_to_the_trainer(tok):
    src = ExternalEpisodes({"p": StalenessControl(1, 1, 8)}, group_size=1)  # 2 per version
    gw = Gateway(admin_key="k", session_gate=src.admit, session_sink=src.on_session_end)
    gw.add_policy("p", [ScriptedEngine(["fine"], tokenizer=tok)], tok)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app),
                                  base_url="http://gw") as http:
        opened = (await http.post("/rl/sessions", json={"policy": "p", "task_id": "t1"},
                                  headers={"Authorization": "Bearer k"})).json()
        first, auth = opened["session_id"], {"Authorization": f"Bearer {opened['api_key']}"}
        assert (await http.post("/v1/chat/completions", headers=auth, json=CHAT)).is_success
        await http.post(f"/rl/sessions/{first}/reward", headers=auth, json={"reward": 1.0})
        r = await http.post(f"/rl/sessions/{first}/refresh", headers=auth,
                            json={"task_id": "t2"})
        assert r.status_code == 200, r.text
        second = r.json()["session_id"]
        assert r.json()["previous_session_id"] == first and second != first
        assert src.buffered("p") == 1  # the first episode reached the trainer
        assert (await http.post("/v1/chat/completions", headers=auth, json=CHAT)).is_success
        assert len(gw.session(second).turns) == 1 and gw.session(second).metadata[
            "task_id"] == "t2"  # same key, new session
        assert (await http.get(f"/rl/sessions/{first}", headers=auth)).status_code == 403
        await http.post(f"/rl/sessions/{second}/reward", headers=auth, json={"reward": 0.5})

        refused = await http.post(f"/rl/sessions/{second}/refresh", headers=auth)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert f"POST /rl/sessions/{second}/refresh again" in refused.json()["error"]["message"]
        assert src.buffered("p") == 2  # the second episode ended all the same
        r = await http.post("/v1/chat/completions", headers=auth, json=CHAT)
        assert r.status_code == 409  # between episodes

        await src.take("p", 2)

        async def push() -> None:
            pass

        await src.update_weights("p", push, 1)  # capacity again
        r = await http.post(f"/rl/sessions/{second}/refresh", headers=auth)
        assert r.status_code == 200, r.text
        third = r.json()["session_id"]
        assert (await http.post("/v1/chat/completions", headers=auth, json=CHAT)).is_success
        assert len(gw.session(third).turns) == 1 and gw.session(third).metadata[
            "task_id"] == "t2"  # kept from the previous session
    assert src.ledger["p"] == {"trained": 2}
    assert gw._between_episodes == {}
    await gw.close()


def test_evicting_an_ended_session_keeps_its_refreshed_keys_later_owner():
    from areal_agents.gateway.sessions import EndedSessions

    ended = EndedSessions(capacity=1)
    ended.add("first", ["key-digest"])
    ended.add("second", ["key-digest"])  # the same key, refreshed into a later session
    assert "first" not in ended and ended.by_digest == {"key-digest": "second"}
