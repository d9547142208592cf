"""Wrappers: TimeLimit, RecordEpisode, TransformObservation, FixedOpponents."""

from __future__ import annotations

import asyncio
import pickle

import pytest

import areal_agents as aa
from areal_agents.errors import EnvError, ResetNeeded, UnknownAgent
from areal_agents.messages import parse_action, user
from areal_agents.testing import GenericMultiAgentEnv, GenericTestEnv
from areal_agents.wrappers.time_limit import MultiAgentTimeLimit


def echo(text: str):
    return aa.ScriptedAgent(lambda obs: text)


async def test_time_limit_single_agent():
    env = aa.TimeLimit(GenericTestEnv(episode_length=10), 3)
    await env.reset(seed=0)
    flags = [(await env.step("a"))[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    with pytest.raises(ResetNeeded):
        await env.step("a")
    await env.reset(seed=0)
    assert env.elapsed_steps == 0


async def test_time_limit_does_not_truncate_a_terminal_step():
    env = aa.TimeLimit(GenericTestEnv(episode_length=2), 2)
    await env.reset(seed=0)
    await env.step("a")
    assert (await env.step("a"))[2:4] == (True, False)


def test_time_limit_rejects_bad_limit():
    with pytest.raises(ValueError, match="positive int"):
        aa.TimeLimit(GenericTestEnv(), 0)


async def test_time_limit_multi_agent_forwards_and_ends_episode():
    inner = GenericMultiAgentEnv(["x", "y"], episode_length=10)
    env = aa.TimeLimit(inner, 2)
    assert isinstance(env, MultiAgentTimeLimit) and isinstance(env, aa.MultiAgentEnv)
    assert env.possible_agents == ["x", "y"]
    obs, _ = await env.reset(seed=0)
    assert env.agents == ["x", "y"]
    with pytest.raises(UnknownAgent):  # the wrapper keeps the misuse guards
        await env.step({"y": "a"})
    await env.step({"x": "a"})
    obs, _, _, truncs, _ = await env.step({"y": "a"})
    assert obs == {} and truncs == {"x": True, "y": True} and env.agents == []
    assert inner.agents == ["x", "y"]
    with pytest.raises(ResetNeeded):
        await env.step({})


async def test_record_episode_single_agent():
    env = aa.RecordEpisode(GenericTestEnv(episode_length=2))
    await env.reset(seed=1)
    await env.step("ab")
    await env.step({"role": "assistant", "content": "c"})
    roles = [m["role"] for m in env.transcripts["agent"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert env.transcripts["agent"][1] == {"role": "assistant", "content": "ab"}
    assert env.rewards == {"agent": [0.0, 1.0]}
    await env.reset(seed=1)
    assert len(env.history) == 1 and env.history[0]["rewards"] == {"agent": [0.0, 1.0]}
    assert env.rewards == {} and len(env.transcripts["agent"]) == 1


async def test_record_episode_multi_agent_and_pickle():
    env = aa.RecordEpisode(GenericMultiAgentEnv(["x", "y"], simultaneous=True, episode_length=1))
    assert isinstance(env, aa.MultiAgentEnv)
    await env.reset(seed=0)
    await env.step({"x": "a", "y": "bb"})
    assert env.rewards == {"x": [1.0], "y": [0.0]}
    assert env.transcripts["y"][-1] == {"role": "assistant", "content": "bb"}
    clone = pickle.loads(pickle.dumps(env))
    assert clone.rewards == env.rewards


async def test_transform_observation_single_and_multi():
    upper = lambda msgs: [{**m, "content": m["content"].upper()} for m in msgs]  # noqa: E731
    env = aa.TransformObservation(GenericTestEnv(), upper)
    obs, _ = await env.reset(seed=0)
    assert obs == [user("SAY SOMETHING")]
    obs, *_ = await env.step("hi")
    assert obs[0]["content"].endswith("YOU SAID 'HI'")
    menv = aa.TransformObservation(GenericMultiAgentEnv(["x", "y"]), upper)
    assert isinstance(menv, aa.MultiAgentEnv)
    obs, _ = await menv.reset(seed=0)
    assert obs["x"][0]["content"].startswith("YOU START")
    with pytest.raises(TypeError, match="callable"):
        aa.TransformObservation(GenericTestEnv(), "nope")


async def test_fixed_opponents_turn_based_accumulates_rewards():
    # player_1 learns; player_0 (scripted, says "xxx": reward 1 to itself) starts
    ma = GenericMultiAgentEnv(["p0", "p1"], episode_length=4)
    seen = []

    async def opponent(obs):
        seen.append(obs)
        return "xxx"

    env = aa.FixedOpponents(ma, learner="p1", opponents={"p0": aa.ScriptedAgent(opponent)})
    assert isinstance(env, aa.AgentEnv) and not isinstance(env, aa.MultiAgentEnv)
    obs, _ = await env.reset(seed=0)
    assert obs[0]["content"].endswith("your turn") and len(seen) == 1
    obs, reward, term, trunc, _ = await env.step("a")  # learner reward 1 (odd length)
    assert (reward, term, trunc) == (1.0, False, False) and len(seen) == 2
    obs, reward, term, trunc, _ = await env.step("ab")  # ends the episode
    assert (reward, term, trunc, obs) == (0.0, True, False, [])
    assert env.opponent_returns == {"p0": 2.0} and env.opponent_samples == {"p0": []}


async def test_fixed_opponents_simultaneous_and_rewards_between_turns():
    def step_fn(env, actions):
        # both act each step; the learner is also paid when the opponent says "gift"
        env.count += 1
        rewards = {"me": 1.0 if parse_action(actions["you"])["content"] == "gift" else 0.0}
        done = env.count >= 2
        if done:
            env.agents = []
        obs = {} if done else {a: [user("go")] for a in env.agents}
        return obs, rewards, {}, {}, {}

    def reset_fn(env):
        env.agents = ["me", "you"]
        return {"me": [user("go")], "you": [user("go")]}, {"me": {"k": 1}}

    ma = GenericMultiAgentEnv(["me", "you"], reset_fn=reset_fn, step_fn=step_fn)
    env = aa.FixedOpponents(ma, learner="me", opponents={"you": echo("gift")})
    obs, info = await env.reset(seed=0)
    assert obs == [user("go")] and info == {"k": 1}
    assert (await env.step("m"))[1:3] == (1.0, False)
    assert (await env.step("m"))[1:3] == (1.0, True)


async def test_fixed_opponents_errors_and_sample_action():
    ma = GenericMultiAgentEnv(["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\['z'\] not in the env's possible_agents"):
        aa.FixedOpponents(ma, learner="z")
    with pytest.raises(ValueError, match="cannot also be an opponent"):
        aa.FixedOpponents(ma, learner="a", opponents={"a": echo("x")})
    env = aa.FixedOpponents(ma, learner="c", opponents={"a": echo("x")})
    with pytest.raises(EnvError, match=r"\['b'\] must act but have no opponent"):
        await env.reset(seed=0)
    assert not hasattr(env, "sample_action")
    ma.sample_action = lambda agent=None: f"move for {agent}"
    assert env.sample_action() == "move for c"


async def test_wrappers_forward_attributes_and_close():
    inner = GenericTestEnv()
    env = aa.RecordEpisode(aa.TimeLimit(inner, 5))
    assert env.unwrapped is inner and env.episode_length == 5
    await env.reset(seed=4)
    assert env.np_random is inner.np_random and env.np_random_seed == 4
    await env.close()
    await env.close()


async def test_fixed_opponents_on_builtin_games_pass_the_checkers():
    from gymnasium.utils.env_checker import check_env as gym_check_env

    from areal_agents.agents.players import pd_tit_for_tat, tictactoe_minimax

    ttt = aa.make("TicTacToe-v0")
    second = ttt.possible_agents[1]
    env = aa.FixedOpponents(
        ttt, learner=second, opponents={ttt.possible_agents[0]: aa.ScriptedAgent(tictactoe_minimax)}
    )
    report = await aa.check_env(env, raise_on_failure=False)
    assert report.ok, str(report)
    # minimax never loses: against itself the learner's return is 0 (draw)
    episode = await aa.run_episode(env, aa.ScriptedAgent(tictactoe_minimax), seed=0)
    assert episode.status == "terminated" and episode.returns == {"agent": 0.0}

    pd = aa.make("PrisonersDilemma-v0")
    a, b = pd.possible_agents
    pd_env = aa.FixedOpponents(pd, learner=a, opponents={b: aa.ScriptedAgent(pd_tit_for_tat)})
    assert (await aa.check_env(pd_env, raise_on_failure=False)).ok
    genv = aa.to_gymnasium(pd_env)
    await asyncio.to_thread(gym_check_env, genv, skip_render_check=True)
    genv.close()
