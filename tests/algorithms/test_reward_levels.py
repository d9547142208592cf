"""Reward levels (process, agent, team): recorded per step, combined per role by the configured
weights (the scalar env reward when none), and each level's total logged per role."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.algorithms.reward_levels import (
    LevelWeights,
    apply_reward_levels,
    level_totals,
    resolve_reward_levels,
    reweigh,
)
from areal_agents.episode import run_episode
from areal_agents.errors import ConfigError
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.testing.envs import GenericTestEnv
from areal_agents.trainers.episodes import EpisodeFailed, play
from areal_agents.trainers.llm_session import Seat, open_seat
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.stats import StepStats

# three steps: a process reward per turn, the agent's outcome and the team's at the end;
# the env's own scalar is their plain sum
LEVELS = [{"process": 0.25}, {"process": -0.5}, {"process": 0.25, "agent": 1.0, "team": 2.0}]


def step(env, action):
    env.count += 1
    levels = LEVELS[env.count - 1]
    return (f"observation {env.count}", sum(levels.values()), env.count == 3, False,
            {"reward_levels": levels})


def test_weights_combine_levels_and_name_bad_input():
    w = LevelWeights.of({"process": 0.5, "team": 0.25})
    assert (w.process, w.agent, w.team) == (0.5, 1.0, 0.25)
    assert reweigh([0.25, -0.5, 3.25], LEVELS, w) == [0.125, -0.25, 1.625]
    assert reweigh([9.0], [{}], w) == [9.0]  # a step without levels keeps its scalar
    assert level_totals(LEVELS) == {"process": 0.0, "agent": 1.0, "team": 2.0}
    with pytest.raises(ValueError, match=r"^reward_levels: unknown reward level\(s\) \['global'\]"
                                         r"; the levels are \['process', 'agent', 'team'\]$"):
        LevelWeights.of({"global": 1.0})
    with pytest.raises(ValueError, match=r"^reward_levels.team must be a finite number, got 'x'$"):
        LevelWeights.of({"team": "x"})
    with pytest.raises(ConfigError, match=r"^reward_levels names agent\(s\) \['judge'\]; the "
                                          r"env's agents are \['x', 'o'\]"):
        resolve_reward_levels({"judge": {"team": 1.0}}, ["x", "o"])
    assert resolve_reward_levels(None, ["x"]) == {}


async def test_run_episode_records_each_steps_levels_and_apply_reweighs_a_copy():
    episode = await run_episode(GenericTestEnv(step_fn=step),
                                aa.agents.ScriptedAgent(lambda o: "a"), seed=0)
    assert episode.reward_levels == {"agent": LEVELS}
    assert episode.rewards == {"agent": [0.25, -0.5, 3.25]} and episode.returns["agent"] == 3.0
    weighted = apply_reward_levels(episode, {"agent": LevelWeights(process=0.0, team=0.5)})
    assert weighted.rewards == {"agent": [0.0, 0.0, 2.0]} and weighted.returns == {"agent": 2.0}
    assert episode.rewards == {"agent": [0.25, -0.5, 3.25]}  # the record is left as reported
    assert apply_reward_levels(episode, {}) is episode


async def test_a_malformed_level_fails_the_episode_naming_the_key():
    def bad(env, action):
        return "o", 1.0, True, False, {"reward_levels": {"team": 1.0, "global": 2.0}}

    episode = await run_episode(GenericTestEnv(step_fn=bad),
                                aa.agents.ScriptedAgent(lambda o: "a"), seed=0)
    assert episode.status == "failed"
    assert episode.error == ("ValueError: info['reward_levels'] has unknown level(s) "
                             "['global']; the levels are ['process', 'agent', 'team']")


async def _play(weights):
    _model, tokenizer = aa.models.tiny("xs", seed=0)
    gateway = aa.Gateway()
    gateway.add_policy("p", [ScriptedEngine([[11, 12], [21], [31, 32]], tokenizer=tokenizer)],
                       tokenizer)
    client = gateway.async_client()
    sessions = []

    async def seat(agent_id: str, name: str, greedy: bool) -> Seat:
        s = await open_seat(gateway, client, Policy(sampling={"max_tokens": 8}), name,
                            agent_id, greedy)
        sessions.append(gateway.session(s.key))
        return s

    by_policy, stats = await play(GenericTestEnv(step_fn=step), 7, policy_of={"agent": "p"},
                                  fixed_agents={}, open_seat=seat, reward_fns=[lambda e: 0.5],
                                  reward_levels=weights)
    (sample,) = by_policy["p"]
    ends = [len(t.prompt_ids) + len(t.completion_ids) - 1 for t in sessions[0].turns]
    await gateway.close()
    return sample, stats, ends


async def test_play_trains_the_weighted_levels_per_turn_and_logs_every_level():
    sample, stats, ends = await _play({"agent": LevelWeights(process=2.0, agent=1.0, team=0.0)})
    # per step: 2 * process (+ agent on the last); the reward function's 0.5 on the last token
    assert sample.token_rewards == {ends[0]: 0.5, ends[1]: -1.0, ends[2]: 0.5 + 1.0 + 0.5}
    assert sample.reward == stats.returns["agent"] == 1.5
    assert stats.levels == {"agent": {"process": 0.0, "agent": 1.0, "team": 2.0}}
    metrics = StepStats.summarise([stats], "train")
    assert {k: v for k, v in metrics.items() if "/reward" in k} == {
        "train/agent/reward": 1.5, "train/agent/reward_agent": 1.0,
        "train/agent/reward_process": 0.0, "train/agent/reward_team": 2.0}


async def test_without_weights_the_env_scalar_is_trained_unchanged():
    sample, stats, ends = await _play(None)
    assert sample.token_rewards == {ends[0]: 0.25, ends[1]: -0.5, ends[2]: 3.25 + 0.5}
    assert sample.reward == stats.returns["agent"] == 3.5
    assert stats.levels == {"agent": {"process": 0.0, "agent": 1.0, "team": 2.0}}  # logged


async def test_a_failing_reward_level_in_play_is_an_episode_failure():
    def bad(env, action):
        return "o", 1.0, True, False, {"reward_levels": [1.0]}

    with pytest.raises(EpisodeFailed, match=r"info\['reward_levels'\] must be a dict"):
        await play(GenericTestEnv(step_fn=bad), 1, policy_of={}, fixed_agents={
            "agent": aa.agents.ScriptedAgent(lambda o: "a")}, open_seat=None,
            reward_fns=[])


def test_trainer_and_yaml_take_weights_per_role():
    from areal_agents.config import RunConfig

    config = RunConfig(env="Signaling-v0", policies={"p": {"model": "tiny:xs"}},
                       policy_map={"speaker": "p", "listener": "p"},
                       reward_levels={"speaker": {"team": 0.5}})
    trainer = config.build()
    assert trainer.reward_levels == {"speaker": LevelWeights(team=0.5)}
    with pytest.raises(ConfigError, match=r"reward_levels names agent\(s\) \['judge'\]"):
        aa.Trainer(env="Signaling-v0", policies={"p": aa.Policy()},
                   policy_map={"speaker": "p", "listener": "p"},
                   reward_levels={"judge": {"team": 1.0}})
