"""Signaling-v0: turn order, message parsing, rewards, rounds, seeding and error paths."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.agents.players import signaling_listener, signaling_speaker
from areal_agents.envs.signaling import Signaling


async def _play(
    env: Signaling, seed: int, speaker=signaling_speaker, listener=signaling_listener
) -> dict[str, float]:
    players = {"speaker": speaker, "listener": listener}
    obs, _ = await env.reset(seed=seed)
    returns = dict.fromkeys(env.possible_agents, 0.0)
    while env.agents:
        obs, rewards, *_ = await env.step({a: players[a](o) for a, o in obs.items()})
        for agent, r in rewards.items():
            returns[agent] += r
    return returns


async def test_turns_prompts_and_reward() -> None:
    env = Signaling(num_items=4)
    obs, _ = await env.reset(seed=0)
    assert list(obs) == ["speaker"] and env.agents == ["speaker", "listener"]
    text = obs["speaker"][0]["content"]
    assert text.endswith(f"target: {env.target}") and "from 0-3" in text
    obs, rewards, terms, truncs, infos = await env.step({"speaker": "I say 2, then 3"})
    assert list(obs) == ["listener"] and rewards == {"speaker": 0.0, "listener": 0.0}
    assert infos["listener"]["message"] == "2" and obs["listener"][0]["content"].endswith(
        "message: 2"
    )
    assert obs["listener"][0]["content"].startswith(f"Items: {' '.join(env.listener_items)}.")
    obs, rewards, terms, truncs, infos = await env.step({"listener": env.target})
    assert obs == {} and env.agents == [] and rewards == {"speaker": 1.0, "listener": 1.0}
    assert terms == {"speaker": True, "listener": True} and truncs == {
        "speaker": False,
        "listener": False,
    }
    with pytest.raises(aa.ResetNeeded):
        await env.step({"speaker": "1"})


async def test_wrong_pick_and_misuse() -> None:
    env = Signaling(num_items=3)
    await env.reset(seed=1)
    with pytest.raises(aa.UnknownAgent):
        await env.step({"listener": "A"})
    with pytest.raises(aa.MissingAction):
        await env.step({})
    obs, *_ = await env.step({"speaker": "no symbols here"})
    assert obs["listener"][0]["content"].endswith("message: (none)")
    wrong = next(i for i in env.items if i != env.target)
    _, rewards, *_, infos = await env.step({"listener": f"I pick {wrong}."})
    assert rewards == {"speaker": 0.0, "listener": 0.0} and infos["speaker"]["choice"] == wrong


def test_parse_choice() -> None:
    env = Signaling(num_items=4)
    env.items, env.listener_items = ["A", "B", "C", "D"], ["C", "A", "D", "B"]
    assert env.parse_choice("B") == "B"
    assert env.parse_choice("I think it is D") == "D"
    assert env.parse_choice("position 1") == "C"
    assert env.parse_choice("nothing") is None
    assert Signaling(vocab_size=12, message_length=2).parse_message("x: ab1c") == "ab"


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_items": 8, "rounds": 3},
        {"num_items": 9, "vocab_size": 3, "message_length": 2},
        {"num_items": 5, "pool_size": 26, "vocab_size": 20},
    ],
)
async def test_scripted_pair_is_optimal(kwargs: dict) -> None:
    env = Signaling(**kwargs)
    for seed in range(4):
        returns = await _play(env, seed)
        assert returns == dict.fromkeys(env.possible_agents, float(env.rounds))


async def test_random_speaker_is_at_chance_and_rounds_report() -> None:
    env = Signaling(num_items=4, rounds=2)
    obs, _ = await env.reset(seed=3)
    obs, *_ = await env.step({"speaker": "0"})
    obs, *_ = await env.step({"listener": "A"})
    assert list(obs) == ["speaker"] and obs["speaker"][0]["content"].startswith("Round 1: target ")
    obs, *_ = await env.step({"speaker": "0"})
    assert obs["listener"][0]["content"].startswith("Round 1: target ")
    total = sum([(await _play(env, s, speaker=lambda o: "0"))["speaker"] for s in range(40)])
    assert 10 <= total <= 30  # 80 rounds at p=1/4 with a constant message


async def test_seeding_and_sample_action() -> None:
    env = aa.make("Signaling-v0")
    a, b, c = (await env.reset(seed=4)), (await env.reset(seed=4)), (await env.reset(seed=6))
    assert a == b
    assert len({str(x) for x in (a, c, await env.reset(seed=7), await env.reset(seed=8))}) > 1
    assert env.unwrapped.sample_action("speaker") in "0123"
    assert env.unwrapped.sample_action("listener") in env.unwrapped.items


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_items": 1}, "num_items"),
        ({"vocab_size": 30}, "vocab_size"),
        ({"rounds": 0}, "rounds"),
        ({"num_items": 5, "pool_size": 4}, "pool_size"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Signaling(**kwargs)
