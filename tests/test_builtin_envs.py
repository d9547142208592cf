"""Every registered env: check_env, a seeded determinism rollout, and the official
Gymnasium / PettingZoo checkers through the adapters."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from pettingzoo.test import parallel_api_test

import areal_agents as aa

ENV_IDS = sorted(aa.registry)
DATA = Path(__file__).parent / "data" / "math_tiny.jsonl"
# envs that cannot be built without arguments (the others use their registered defaults)
ENV_KWARGS = {"Dataset-v0": {"path": str(DATA)}, "DatasetMultiTurn-v0": {"path": str(DATA)}}
KEY_WARNINGS = ("Live agent was not given", "but was dead last turn")


def _make(env_id):
    return aa.make(env_id, **ENV_KWARGS.get(env_id, {}))


def _sampler(env, agent):
    sample = getattr(env, "sample_action", None)
    return (lambda: sample(agent)) if callable(sample) else (lambda: "0")


class Replay(aa.Agent):
    """Plays ``sample()`` actions while recording them, or replays a recorded list."""

    def __init__(self, sample=None, actions=None) -> None:
        self.sample, self.actions = sample, list(actions or [])
        self.replay = actions is not None

    async def act(self, observation):
        if self.replay:
            return self.actions.pop(0)
        action = self.sample()
        self.actions.append(action)
        return action


def test_some_envs_are_registered():
    assert "Countdown-v0" in ENV_IDS


@pytest.mark.parametrize("env_id", ENV_IDS)
async def test_check_env(env_id):
    report = await aa.check_env(_make(env_id), raise_on_failure=False)
    assert report.ok, str(report)
    assert "from_spec" in report.passed


@pytest.mark.parametrize("env_id", ENV_IDS)
async def test_seeded_rollout_is_deterministic(env_id):
    env = _make(env_id)
    multi = isinstance(env, aa.MultiAgentEnv)
    ids = list(env.possible_agents) if multi else ["agent"]
    recorders = {a: Replay(sample=_sampler(env, a if multi else None)) for a in ids}
    first = await aa.run_episode(env, recorders if multi else recorders["agent"], seed=11)
    assert first.status != "failed", first.error
    replays = {a: Replay(actions=r.actions) for a, r in recorders.items()}
    second = await aa.run_episode(_make(env_id), replays if multi else replays["agent"], seed=11)
    assert second.messages == first.messages
    assert second.rewards == first.rewards and second.length == first.length


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_official_checker_through_adapter(env_id):
    env = _make(env_id)
    if isinstance(env, aa.MultiAgentEnv):
        penv = aa.to_pettingzoo(env)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parallel_api_test(penv, num_cycles=300)
        bad = [str(w.message) for w in caught if any(k in str(w.message) for k in KEY_WARNINGS)]
        assert not bad, bad
        penv.close()
    else:
        genv = aa.to_gymnasium(env)
        gym_check_env(genv, skip_render_check=True)
        genv.close()
