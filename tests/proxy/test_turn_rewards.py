"""Per-turn rewards posted through the proxy become ``Sample.token_rewards`` of the trained
samples (on the rewarded turn's last generated token; the rest of the reward on the last)."""

from __future__ import annotations

import httpx2

from areal_agents.gateway import Gateway
from areal_agents.gateway.sessions import Session, Turn
from areal_agents.models import tiny_tokenizer
from areal_agents.rollout.staleness import StalenessControl
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.external import ExternalEpisodes, session_samples


def _turn(prompt: list[int], completion: list[int], request_id: str) -> Turn:
    return Turn(prompt_ids=prompt, completion_ids=completion, logprobs=[-0.5] * len(completion),
                versions=[0] * len(completion), messages=None, reply=None, tools=None,
                finish_reason="stop", request_id=request_id)


def _two_turns() -> Session:
    s = Session(policy="p", metadata={"task_id": "t", "role": "solver", "admitted_version": 0})
    s.record(_turn([1, 2], [3, 4], "c0"))  # sample positions 2, 3
    s.record(_turn([1, 2, 3, 4, 5], [6, 7], "c1"))  # extends it: 5 (prompt), 6, 7
    return s


def test_turn_rewards_land_on_each_turns_last_token_and_the_rest_on_the_last():
    s = _two_turns()
    s.add_reward(0.5, turn=0)
    s.add_reward(0.25, turn=1)
    s.add_reward(1.0)  # the session's (outcome) reward
    [sample] = session_samples(s, "t")
    assert sample.token_ids == [1, 2, 3, 4, 5, 6, 7]
    assert sample.reward == 1.75 and (sample.group, sample.agent) == ("t", "solver")
    assert sample.token_rewards == {3: 0.5, 6: 1.25}


def test_without_turn_rewards_token_rewards_stay_none():
    s = _two_turns()
    s.add_reward(1.0)
    [sample] = session_samples(s, "t")
    assert sample.token_rewards is None and sample.reward == 1.0


def test_a_split_session_puts_later_samples_rewards_on_the_earlier_ones_last_token():
    s = Session(policy="p", metadata={})
    s.record(_turn([1, 2], [3], "c0"))
    s.record(_turn([9, 8], [7], "c1"))  # history edited: a second sample
    s.add_reward(2.0, turn=1)
    first, second = session_samples(s, "g")
    assert second.token_rewards == {2: 2.0}
    assert first.token_rewards == {2: 2.0}  # the return from its first turn on


async def test_rewards_posted_per_turn_over_http_reach_the_trained_samples():
    tok = tiny_tokenizer()
    src = ExternalEpisodes({"p": StalenessControl(1, 0, 4)}, group_size=1)
    gw = Gateway(admin_key="k", session_gate=src.admit, session_sink=src.on_session_end)
    gw.add_policy("p", [ScriptedEngine(["4", "yes"], tokenizer=tok)], tok)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app),
                                  base_url="http://gw") as http:
        opened = (await http.post("/rl/sessions", json={"policy": "p", "task_id": "q"},
                                  headers={"Authorization": "Bearer k"})).json()
        auth = {"Authorization": f"Bearer {opened['api_key']}"}
        messages = [{"role": "user", "content": "2 + 2 ="}]
        first = (await http.post("/v1/chat/completions", headers=auth, json={
            "model": "p", "messages": messages})).json()
        messages += [first["choices"][0]["message"], {"role": "user", "content": "sure?"}]
        await http.post("/v1/chat/completions", headers=auth, json={
            "model": "p", "messages": messages})
        sid = opened["session_id"]
        for body in ({"reward": 0.5, "completion_id": first["id"]}, {"reward": 1.0}):
            r = await http.post(f"/rl/sessions/{sid}/reward", headers=auth, json=body)
            assert r.status_code == 200, r.text
        assert (await http.post(f"/rl/sessions/{sid}/end", headers=auth)).status_code == 200
    [group] = await src.take("p", 1)
    [sample] = group.samples
    first_ids = first["prompt_token_ids"] + first["choices"][0]["token_ids"]
    assert sample.token_ids[:len(first_ids)] == first_ids
    last = max(i for i, m in enumerate(sample.loss_mask) if m)
    assert sample.token_rewards == {len(first_ids) - 1: 0.5, last: 1.0}
    assert sample.reward == 1.5
    await gw.close()
