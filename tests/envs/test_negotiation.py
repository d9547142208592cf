"""Negotiation-v0: valuations, proposals, accept, invalid replies, turn limit, seeding, misuse."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.agents.players import NegotiationFair
from areal_agents.envs.negotiation import Negotiation, valuations


def test_valuations_are_exact() -> None:
    options = valuations((1, 2, 3), 10)
    assert (4, 0, 2) in options and all(a + 2 * b + 3 * c == 10 for a, b, c in options)
    assert valuations((3, 3, 3), 10) == []


async def _setup(seed: int = 0) -> Negotiation:
    env = Negotiation(num_types=3, max_count=3, total=10, max_turns=4)
    await env.reset(seed=seed)
    env.counts = [1, 2, 3]
    env.values = {"alice": [4, 0, 2], "bob": [1, 3, 1]}
    return env


async def test_proposal_and_accept_rewards() -> None:
    env = await _setup()
    obs, rewards, terms, _, infos = await env.step(
        {"alice": "I want the book and balls. propose: 1 0 3"}
    )
    assert list(obs) == ["bob"] and rewards == {"alice": 0.0, "bob": 0.0} and not terms["bob"]
    assert infos["bob"]["reply"] == [1, 0, 3]
    assert obs["bob"][0]["content"].startswith(
        "Divide 1 book, 2 hat, 3 ball with Alice. Your values: book 1, hat 3, ball 1"
    )
    assert obs["bob"][-1]["content"] == (
        "Alice: I want the book and balls. propose: 1 0 3\nOffer: you get 0 book, 2 hat, 0 ball (worth 6 to you)."
    )
    obs, rewards, terms, _, infos = await env.step({"bob": "OK, accept."})
    assert obs == {} and env.agents == [] and terms == {"alice": True, "bob": True}
    assert rewards == {"alice": 1.0, "bob": 0.6}
    assert infos["alice"]["share"] == [1, 0, 3] and infos["bob"]["share"] == [0, 2, 0]
    with pytest.raises(aa.ResetNeeded):
        await env.step({"alice": "accept"})


async def test_invalid_replies_waste_the_turn() -> None:
    env = await _setup()
    obs, *_ = await env.step({"alice": "accept"})
    assert obs["bob"][-1]["content"].endswith(
        "Invalid reply (there is no offer from the other agent to accept)."
    )
    obs, *_ = await env.step({"bob": "propose: 2 0 0"})
    assert "asked for more than there is (1 book, 2 hat, 3 ball)" in obs["alice"][-1]["content"]
    assert len(obs["alice"]) == 1  # alice already saw the task
    await env.step({"alice": "propose: 1 1 1"})
    obs, rewards, _terms, _, infos = await env.step({"bob": "hmm"})  # 4th reply: turn limit
    assert obs == {} and rewards == {"alice": 0.0, "bob": 0.0} and infos["alice"]["deal"] is False


async def test_cannot_accept_own_offer() -> None:
    env = await _setup()
    await env.step({"alice": "propose: 1 0 0"})
    obs, *_ = await env.step({"bob": "what?"})
    assert obs["alice"][-1]["content"].endswith(
        "Invalid reply (no proposal found; reply 'propose:' and 3 numbers, or 'accept'). The last offer stands."
    )
    obs, rewards, *_ = await env.step({"alice": "accept"})
    assert env.agents == ["alice", "bob"] and rewards == {"alice": 0.0, "bob": 0.0}


async def test_fair_players_reach_deals() -> None:
    env = aa.make("Negotiation-v0")
    for seed in range(20):
        players = {"alice": NegotiationFair(), "bob": NegotiationFair()}
        obs, infos0 = await env.reset(seed=seed)
        values = {a: infos0[a]["values"] for a in ("alice", "bob")}
        total = dict.fromkeys(values, 0.0)
        while env.unwrapped.agents:
            obs, rewards, _, _, infos = await env.step({a: players[a](o) for a, o in obs.items()})
            for a, r in rewards.items():
                total[a] += r
        assert infos["alice"]["deal"]
        for a in total:
            assert (
                total[a]
                == sum(k * v for k, v in zip(infos[a]["share"], values[a], strict=True)) / 10
            )
        assert sum(total.values()) >= 0.8


async def test_seeding_and_sample_action() -> None:
    env = Negotiation()
    a, b = (await env.reset(seed=5)), (await env.reset(seed=5))
    assert a == b
    for agent in ("alice", "bob"):
        assert (
            sum(c * v for c, v in zip(a[1][agent]["counts"], a[1][agent]["values"], strict=True))
            == 10
        )
    assert {env.sample_action("alice").split(":")[0] for _ in range(40)} == {"accept", "propose"}


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="num_types"):
        Negotiation(num_types=9)
