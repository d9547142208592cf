"""check_env passes good envs and catches broken ones (built inline with the testing envs)."""

from __future__ import annotations

import asyncio
import random

import pytest

import areal_agents as aa
from areal_agents.errors import EnvError
from areal_agents.messages import parse_action, user
from areal_agents.testing import DynamicAgentsEnv, GenericMultiAgentEnv, GenericTestEnv


async def check(env):
    return await aa.check_env(env, raise_on_failure=False)


@pytest.mark.parametrize(
    "make_env",
    [
        lambda: GenericTestEnv(),
        lambda: GenericMultiAgentEnv(),
        lambda: GenericMultiAgentEnv(["a", "b", "c"], simultaneous=True),
        lambda: DynamicAgentsEnv(),
        lambda: aa.TimeLimit(GenericTestEnv(episode_length=50), 3),
        lambda: aa.RecordEpisode(GenericMultiAgentEnv()),
    ],
    ids=["single", "turns", "simultaneous", "dynamic", "time_limit", "record_multi"],
)
async def test_good_envs_pass(make_env):
    report = await check(make_env())
    assert report.ok, str(report)
    assert {"types_and_determinism", "step_before_reset", "close_twice"} <= set(report.passed)
    assert report.skipped == {"from_spec": "env.spec is None (not made by aa.make)"}


async def test_multi_agent_checks_present():
    report = await check(DynamicAgentsEnv())
    assert {"unknown_agent", "missing_action", "cancel_step", "cancel_reset"} <= set(report.passed)


def _nondeterministic_reset(env):
    return [user(f"task {random.random()}")], {}


async def test_catches_nondeterminism():
    report = await check(GenericTestEnv(reset_fn=_nondeterministic_reset))
    assert report.failed("types_and_determinism") and report.failed("determinism_new_instance")
    failure = next(f for f in report.failures if f.check == "types_and_determinism")
    assert "same seed, same actions" in failure.expected and "task 0." in failure.seen


def _str_reward_step(env, action):
    env.count += 1
    return [user("ok")], "1.0", env.count >= 2, False, {}


def _non_message_obs_reset(env):
    return [{"text": "no role"}], {}


def _int_flag_step(env, action):
    return [], 1.0, 1, False, {}


@pytest.mark.parametrize(
    ("kwargs", "expected", "seen"),
    [
        ({"step_fn": _str_reward_step}, "step reward: a finite float reward", "'1.0'"),
        ({"reset_fn": _non_message_obs_reset}, "reset obs: messages", "{'text': 'no role'}"),
        ({"step_fn": _int_flag_step}, "terminated: a bool", "1"),
    ],
    ids=["str_reward", "obs_not_messages", "int_flag"],
)
async def test_catches_wrong_types(kwargs, expected, seen):
    report = await check(GenericTestEnv(**kwargs))
    failure = next(f for f in report.failures if f.check == "types_and_determinism")
    assert failure.expected.startswith(expected) and failure.seen == seen


async def test_catches_missing_misuse_errors_single_agent():
    report = await check(GenericTestEnv(guards=False))
    for name in ("step_before_reset", "step_after_end"):
        failure = next(f for f in report.failures if f.check == name)
        assert failure.expected.endswith("raises ResetNeeded") and failure.seen == "no error"


async def test_catches_missing_misuse_errors_multi_agent():
    report = await check(GenericMultiAgentEnv(guards=False))
    assert report.failed("unknown_agent") and report.failed("missing_action")
    seen = {f.check: f.seen for f in report.failures}
    assert seen["unknown_agent"] == "no error" and seen["missing_action"] == "no error"
    assert "ZeroDivisionError" in seen["step_before_reset"]


async def test_catches_wrong_multi_agent_keys():
    def step_fn(env, actions):
        env.agents = []
        return {}, {"ghost": 1.0}, {}, {}, {}

    report = await check(GenericMultiAgentEnv(step_fn=step_fn))
    failure = next(f for f in report.failures if f.check == "types_and_determinism")
    assert (
        failure.expected.startswith("step rewards: keys within")
        and failure.seen == "keys ['ghost']"
    )


class HalfStepOnCancel(GenericTestEnv):
    """Mutates state, then awaits: a cancelled step leaves a half-applied move."""

    async def step(self, action):
        self.count += 1
        await asyncio.sleep(0.001)
        return [user(f"count {self.count}")], 0.0, self.count >= 3, False, {}

    async def reset(self, *, seed=None, options=None):
        await super().reset(seed=seed)
        await asyncio.sleep(0.001)
        self.started = True  # state that a cancelled reset must not corrupt
        return [user("go")], {}


class CorruptedByCancel(HalfStepOnCancel):
    """A step cancelled mid-way leaves a flag that makes every later step crash."""

    async def step(self, action):
        if getattr(self, "broken", False):
            raise RuntimeError("env state corrupted by an interrupted step")
        self.broken = True
        await asyncio.sleep(0.001)
        self.broken = False
        return [user("fine")], 0.0, True, False, {}


class Unpicklable(GenericTestEnv):
    """Holds a generator (not picklable) and fails on a second close."""

    def __init__(self):
        super().__init__()
        self.gen = (i for i in range(3))

    async def close(self):
        if getattr(self, "closed", False):
            raise RuntimeError("already closed")
        self.closed = True


async def test_cancellation_checks():
    assert (await check(HalfStepOnCancel())).ok  # reset(seed) restores everything
    report = await check(CorruptedByCancel())
    assert report.failed("cancel_step")
    failure = next(f for f in report.failures if f.check == "cancel_step")
    assert "RuntimeError: env state corrupted" in failure.seen


async def test_catches_unpicklable_env_and_close_twice_error():
    report = await check(Unpicklable())
    assert report.failed("pickle") and report.failed("close_twice")
    assert "generator" in next(f.seen for f in report.failures if f.check == "pickle")


async def test_report_text_and_html_and_raise():
    bad = GenericTestEnv(reset_fn=_nondeterministic_reset)
    with pytest.raises(EnvError, match=r"check_env\(GenericTestEnv\): FAIL"):
        await aa.check_env(bad)
    report = await check(GenericTestEnv(reset_fn=_nondeterministic_reset))
    text = str(report)
    assert "FAIL  types_and_determinism" in text and "expected:" in text and "seen:" in text
    html = report._repr_html_()
    assert "<table>" in html and "types_and_determinism" in html


async def test_check_env_by_id_runs_from_spec():
    report = await aa.check_env("Countdown-v0")
    assert report.ok and "from_spec" in report.passed and report.env == "Countdown-v0"


async def test_sample_action_is_used():
    seen: list[str] = []

    def step_fn(env, action):
        seen.append(parse_action(action)["content"])
        return [], 0.0, True, False, {}

    await check(GenericTestEnv(step_fn=step_fn, sample_action_fn=lambda: "sampled"))
    assert seen and set(seen) == {"sampled"}


def test_rejects_non_env():
    with pytest.raises(TypeError, match="check_env takes"):
        asyncio.run(aa.check_env(object()))  # type: ignore[arg-type]


async def test_extra_wrappers_over_a_made_env_are_rebuilt_by_copy_not_spec():
    env = aa.RecordEpisode(aa.make("Countdown-v0"))
    report = await check(env)
    assert report.ok, str(report)
    assert "determinism_new_instance" in report.passed
    assert report.skipped["from_spec"].startswith("the env is wrapped beyond what its spec builds")


async def test_catches_bad_possible_agents():
    env = GenericMultiAgentEnv(["x", "y"])
    env.possible_agents = ["x", 2]  # ids must be str
    report = await check(env)
    failure = next(f for f in report.failures if f.check == "types_and_determinism")
    assert (
        failure.expected == "possible_agents: a non-empty list of str ids" and failure.seen == "['x', 2]"
    )
