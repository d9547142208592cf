"""Gymnasium / PettingZoo adapters: spaces, values, official checkers on the testing envs."""

from __future__ import annotations

import json
import warnings

import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from pettingzoo.test import parallel_api_test

import areal_agents as aa
from areal_agents.adapters import decode_action
from areal_agents.messages import parse_action, user
from areal_agents.testing import DynamicAgentsEnv, GenericMultiAgentEnv, GenericTestEnv

# PettingZoo's warnings about keys of live/dead agents mean an adapter bug
KEY_WARNINGS = ("Live agent was not given", "but was dead last turn")


def run_parallel_api_test(env, num_cycles=200):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallel_api_test(env, num_cycles=num_cycles)
    bad = [str(w.message) for w in caught if any(k in str(w.message) for k in KEY_WARNINGS)]
    assert not bad, bad


def test_gymnasium_adapter_values_and_checker():
    genv = aa.to_gymnasium(GenericTestEnv(episode_length=2))
    obs, info = genv.reset(seed=1)
    assert json.loads(obs) == [user("say something")] and set(info) == {"target"}
    assert obs in genv.observation_space
    obs, reward, term, trunc, info = genv.step("ab")
    assert "you said 'ab'" in json.loads(obs)[0]["content"]
    assert (reward, term, trunc, info) == (0.0, False, False, {})
    assert genv.step("a")[1:3] == (1.0, True)
    gym_check_env(genv, skip_render_check=True)
    genv.close()
    genv.close()


def test_gymnasium_adapter_rejects_multi_agent_env():
    with pytest.raises(TypeError, match="use to_pettingzoo"):
        aa.to_gymnasium(GenericMultiAgentEnv())
    with pytest.raises(TypeError, match="use to_gymnasium"):
        aa.to_pettingzoo(GenericTestEnv())


def test_non_ascii_observations_stay_in_space():
    env = GenericTestEnv(reset_fn=lambda e: ([user("héllo\n✓")], {}))
    genv = aa.to_gymnasium(env)
    obs, _ = genv.reset(seed=0)
    assert obs in genv.observation_space and json.loads(obs)[0]["content"] == "héllo\n✓"
    genv.close()


def test_json_actions_carry_tool_calls():
    msg = {"role": "assistant", "content": None, "tool_calls": [aa.tool_call("add", {"a": 1})]}
    assert decode_action(json.dumps(msg)) == msg
    assert decode_action("{not json") == "{not json"
    assert decode_action('{"role": "user"}') == '{"role": "user"}'
    seen = []

    def step_fn(env, action):
        seen.append(parse_action(action))
        return [], 0.0, True, False, {}

    genv = aa.to_gymnasium(GenericTestEnv(step_fn=step_fn))
    genv.reset(seed=0)
    genv.step(json.dumps(msg))
    assert seen[0]["tool_calls"][0]["function"]["name"] == "add"
    genv.close()


async def test_adapter_works_when_called_inside_a_running_loop():
    genv = aa.to_gymnasium(GenericTestEnv())
    obs, _ = genv.reset(seed=0)  # runs on the adapter's loop in a helper thread
    assert json.loads(obs)[0]["content"] == "say something"
    genv.close()


@pytest.mark.parametrize(
    "make_env",
    [
        lambda: GenericMultiAgentEnv(),
        lambda: GenericMultiAgentEnv(["a", "b", "c"], simultaneous=True),
        lambda: DynamicAgentsEnv(num_steps=30),
    ],
    ids=["turns", "simultaneous", "dynamic"],
)
def test_pettingzoo_parallel_api_test(make_env):
    penv = aa.to_pettingzoo(make_env())
    run_parallel_api_test(penv)
    penv.close()
    penv.close()


def test_pettingzoo_adapter_turn_semantics():
    penv = aa.to_pettingzoo(GenericMultiAgentEnv(["x", "y"], episode_length=2))
    obs, infos = penv.reset(seed=0)
    assert penv.agents == ["x", "y"] and obs["y"] == "[]"
    assert infos["x"]["acting"] is True and infos["y"]["acting"] is False
    obs, rewards, terms, truncs, infos = penv.step({"x": "a", "y": "ignored"})
    assert rewards == {"x": 1.0, "y": 0.0} and infos["y"]["acting"] is True
    obs, rewards, terms, truncs, infos = penv.step({"x": "ignored", "y": "bb"})
    assert penv.agents == [] and terms == {"x": True, "y": True}
    assert truncs == {"x": False, "y": False} and rewards == {"x": 0.0, "y": 0.0}
    assert penv.observation_space("x") is penv.observation_space("x")
