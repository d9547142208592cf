"""A failing demo episode in the warm start is counted and skipped, as in the RL phase; the run
fails only when too few demonstrations remain."""

from __future__ import annotations

import json

import pytest

import areal_agents as aa
from areal_agents.errors import TrainError
from areal_agents.messages import user
from areal_agents.testing import GenericTestEnv
from areal_agents.trainers.warm_start import collect_demos

BAD_SEEDS = {101, 104, 106}


def flaky_reset(env):
    """Raises on the seeds in ``BAD_SEEDS`` (a transient env fault), else one user message."""
    if env.np_random_seed in BAD_SEEDS:
        raise ConnectionError(f"sandbox for seed {env.np_random_seed} did not start")
    return [user("say something")], {}


def flaky_env():
    return GenericTestEnv(reset_fn=flaky_reset, episode_length=1)


def player(observation):
    return "ok"


async def test_failed_demo_episodes_are_counted_and_skipped():
    demos = await collect_demos(flaky_env, {"agent": player}, range(100, 108))
    assert (demos.num_episodes, demos.num_failed) == (5, 3)
    assert len(demos.transcripts["agent"]) == 5
    assert all(t[-1] == {"role": "assistant", "content": "ok"} for t in demos.transcripts["agent"])


async def test_too_few_demos_is_a_train_error_with_the_counts():
    with pytest.raises(TrainError) as info:
        await collect_demos(flaky_env, {"agent": player}, range(100, 108), min_episodes=6)
    assert str(info.value) == (
        "warm start: 5 of 8 demo episodes finished (3 failed; the last error: ConnectionError: "
        "sandbox for seed 106 did not start), 6 are needed; fix the env or the demo players, or "
        "lower warm_start.min_episodes")
    demos = await collect_demos(flaky_env, {"agent": player}, range(100, 108), min_episodes=5)
    assert demos.num_episodes == 5
    with pytest.raises(TrainError, match="0 of 3 demo episodes finished"):
        await collect_demos(flaky_env, {"agent": player}, [104, 106, 101])


async def test_the_trainer_warm_starts_past_a_flaky_env_and_logs_the_failures(tmp_path):
    policy = aa.Policy(lr=1e-3, sft_steps=2, api="completions",
                       sampling={"temperature": 1.0, "max_tokens": 2})
    trainer = aa.Trainer(
        env=flaky_env, policies={"p": policy}, policy_map={"agent": "p"},
        warm_start={"episodes": 8, "seed": 100, "players": {"agent": player}},
        batch_size=4, group_size=2, run_dir=tmp_path, progress=False)
    try:
        history = await trainer.afit(1)
    finally:
        await trainer.aclose()
    assert [h["step"] for h in history] == [1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    warm = [r for r in rows if "warm_start/p/failed_episodes" in r]
    assert len(warm) == 1 and warm[0]["step"] == 0
    assert warm[0]["warm_start/p/failed_episodes"] == 3.0
    assert warm[0]["warm_start/p/nll_last"] < warm[0]["warm_start/p/nll_first"]
    # two steps: the window mean is their mean; every step ran (no target loss)
    assert warm[0]["warm_start/p/nll_last_mean"] == pytest.approx(
        (warm[0]["warm_start/p/nll_first"] + warm[0]["warm_start/p/nll_last"]) / 2)
    assert warm[0]["warm_start/p/steps"] == 2.0
