"""Per-turn (process) rewards: each env step's reward sits on the last generated token of the
turn (LLM call) that produced the action it rewards, and PPO's GAE reads them there."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import areal_agents as aa
from areal_agents.algorithms.token_level import PPO
from areal_agents.episode import run_episode
from areal_agents.samples import Sample, collate
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.testing.envs import GenericTestEnv
from areal_agents.trainers.episodes import assign_turn_rewards, play
from areal_agents.trainers.llm_session import Seat, open_seat
from areal_agents.trainers.policy import Policy

# two turns: generated tokens at 1, 2 (turn 0) and 4 (turn 1); an observation token at 3
MASK = [0, 1, 1, 0, 1]
VALUES = [0.0, 0.5, 0.6, 0.0, 0.2]


def _two_turns(token_rewards: dict[int, float] | None) -> Sample:
    return Sample([5, 6, 7, 8, 9], MASK, [0.0, -1.0, -1.0, 0.0, -1.0], [-1, 0, 0, -1, 0],
                  reward=1.0, token_rewards=token_rewards)


def test_gae_uses_each_turns_reward_hand_computed():
    """Rewards 1 (turn 0) then 0 (turn 1), gamma = lambda = 1: A_t = G_t - V_t with G the
    reward-to-go over generated tokens: G = 1 at 1 and 2, 0 at 4."""
    ppo = PPO(gamma=1.0, gae_lambda=1.0, adv_norm=False)
    (adv,) = ppo.advantages([_two_turns({2: 1.0, 4: 0.0})], [VALUES])
    assert adv == pytest.approx([0.0, 0.5, 0.4, 0.0, -0.2])
    # the episode total on the last token (what a sample without token_rewards gets)
    (terminal,) = ppo.advantages([_two_turns(None)], [VALUES])
    assert terminal == pytest.approx([0.0, 0.5, 0.4, 0.0, 0.8])


def test_prepare_returns_and_discounting_with_turn_rewards():
    sample = _two_turns({2: 1.0, 4: 0.0})
    batch = dataclasses.replace(collate([sample]), values=torch.tensor([VALUES]))
    out = PPO(gamma=1.0, gae_lambda=1.0, adv_norm=False).prepare(batch, [sample])
    assert out.returns[0].tolist() == pytest.approx([0.0, 1.0, 1.0, 0.0, 0.0])
    # gamma 0.5, zero values: G_2 = 1, G_1 = 0.5 * G_2, nothing after turn 0 reaches it back
    (adv,) = PPO(gamma=0.5, gae_lambda=1.0, adv_norm=False).advantages([sample])
    assert adv == pytest.approx([0.0, 0.5, 1.0, 0.0, 0.0])


def test_collate_builds_token_rewards_only_when_a_sample_has_them():
    plain = Sample([1, 2, 3], [0, 1, 1], [0.0, -1.0, -1.0], [-1, 0, 0], reward=3.0)
    assert collate([plain]).token_rewards is None
    batch = collate([_two_turns({2: 1.0, 4: -0.5}), plain])
    assert batch.token_rewards.tolist() == [[0.0, 0.0, 1.0, 0.0, -0.5],
                                            [0.0, 0.0, 3.0, 0.0, 0.0]]
    assert batch.rewards.tolist() == [1.0, 3.0]  # the scalar stays for GRPO/RLOO
    assert batch.select([1]).token_rewards.tolist() == [[0.0, 0.0, 3.0]]


def test_a_token_reward_off_the_generated_tokens_is_refused():
    with pytest.raises(ValueError, match=r"^Sample.token_rewards has a reward at position 3, "
                       r"which is not a generated token \(the sample has 5 tokens\)"):
        _two_turns({3: 1.0})


def test_assign_turn_rewards_split_session_and_rewards_of_no_turn():
    """Turns 0, 1 in sample a, turn 2 (split off) in sample b; a reward before the first action
    counts for the first; ``extra`` and later samples' rewards go on each last token."""
    a = Sample([1, 2, 3, 4], [0, 1, 0, 1], [0.0] * 4, [-1, 0, -1, 0], meta={"turns": [0, 1]})
    b = Sample([9, 8, 7], [0, 1, 1], [0.0] * 3, [-1, 0, 0], meta={"turns": [2]})
    assign_turn_rewards([a, b], turn_ends=[2, 4, 3], action_turns=[0, 1, 2],
                        rewards=[0.25, 1.0, 2.0, 4.0], reward_actions=[-1, 0, 1, 2], extra=0.5)
    assert a.token_rewards == {1: 1.25, 3: 2.0 + 4.5}
    assert b.token_rewards == {2: 4.5}


async def test_run_episode_records_which_action_each_reward_follows():
    rewards = iter([1.0, 2.0, 4.0])

    def step(env, action):
        env.count += 1
        return "obs", next(rewards), env.count == 3, False, {}

    episode = await run_episode(GenericTestEnv(step_fn=step),
                                aa.agents.ScriptedAgent(lambda o: "x"), seed=0)
    assert episode.rewards == {"agent": [1.0, 2.0, 4.0]}
    assert episode.reward_actions == {"agent": [0, 1, 2]}


async def test_a_reward_on_another_agents_step_follows_this_agents_latest_action():
    """Signaling: the speaker acts, then the listener; the round's reward comes on the
    listener's step and counts for the speaker's action of that round."""
    env = aa.make("Signaling-v0", rounds=2)
    agents = {"speaker": aa.agents.ScriptedAgent(lambda o: "0"),
              "listener": aa.agents.ScriptedAgent(lambda o: "A")}
    episode = await run_episode(env, agents, seed=3)
    assert episode.reward_actions == {"speaker": [0, 0, 1, 1], "listener": [-1, 0, 0, 1]}


async def test_three_turn_episode_rewards_land_on_each_turns_last_token():
    _model, tokenizer = aa.models.tiny("xs", seed=0)
    gateway = aa.Gateway()
    script = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]  # each turn's completion ids
    gateway.add_policy("p", [ScriptedEngine(script, tokenizer=tokenizer)], tokenizer)
    client = gateway.async_client()
    policy = Policy(sampling={"max_tokens": 8})
    sessions = []

    async def seat(agent_id: str, name: str, greedy: bool) -> Seat:
        s = await open_seat(gateway, client, policy, name, agent_id, greedy)
        sessions.append(gateway.session(s.key))
        return s

    step_rewards = iter([1.0, 2.0, 4.0])

    def step(env, action):
        env.count += 1
        return f"observation {env.count}", next(step_rewards), env.count == 3, False, {}

    by_policy, stats = await play(GenericTestEnv(step_fn=step), 7, policy_of={"agent": "p"},
                                  fixed_agents={}, open_seat=seat, reward_fns=[lambda e: 0.5])
    (sample,) = by_policy["p"]
    (session,) = sessions
    assert sample.meta["turns"] == [0, 1, 2]
    assert sample.reward == stats.returns["agent"] == 7.5
    ends = [len(t.prompt_ids) + len(t.completion_ids) - 1 for t in session.turns]
    assert [sample.token_ids[p] for p in ends] == [13, 22, 34]
    assert sample.token_rewards == {ends[0]: 1.0, ends[1]: 2.0, ends[2]: 4.0 + 0.5}
    assert all(sample.loss_mask[p] == 1 for p in ends)
    await gateway.close()


def test_a_reward_added_after_the_episode_reaches_the_per_turn_rewards_too() -> None:
    """A group judge's reward (``Sample.add_reward``) lands on the last generated token when
    the sample carries per-turn rewards (PPO's GAE reads those, not ``reward``)."""
    sample = Sample([1, 2, 3, 4, 5], [0, 1, 0, 1, 1], [0.0] * 5, [-1, 0, -1, 0, 0], reward=1.5,
                    token_rewards={1: 1.0, 4: 0.5})
    sample.add_reward(2.0)
    assert sample.reward == 3.5 and sample.token_rewards == {1: 1.0, 4: 2.5}
    plain = Sample([1, 2], [0, 1], [0.0, 0.0], [-1, 0], reward=1.0)
    plain.add_reward(-0.5)
    assert plain.reward == 0.5 and plain.token_rewards is None
