"""The env base classes: seeding, misuse errors, cancellation, lifecycle."""

from __future__ import annotations

import asyncio

import pytest

import areal_agents as aa
from areal_agents.errors import MissingAction, ResetNeeded, UnknownAgent
from areal_agents.testing import GenericMultiAgentEnv, GenericTestEnv


async def test_single_agent_misuse_errors():
    env = GenericTestEnv(episode_length=1)
    with pytest.raises(ResetNeeded, match=r"step\(\) called before reset\(\)"):
        await env.step("x")
    obs, info = await env.reset(seed=3)
    assert obs == [{"role": "user", "content": "say something"}]
    assert set(info) == {"target"}
    _, _, terminated, truncated, _ = await env.step("x")
    assert (terminated, truncated) == (True, False)
    with pytest.raises(ResetNeeded, match="after the episode ended"):
        await env.step("x")
    await env.reset()
    await env.step("again")  # a new episode works


async def test_seeding_is_deterministic_and_validated():
    a, b = GenericTestEnv(), GenericTestEnv()
    _, ia = await a.reset(seed=7)
    _, ib = await b.reset(seed=7)
    assert ia == ib and a.np_random_seed == 7
    assert [await a.step("x") for _ in range(3)] == [await b.step("x") for _ in range(3)]
    await a.reset(seed=8)
    assert a.np_random_seed == 8
    with pytest.raises(ValueError, match="non-negative int"):
        await a.reset(seed=-1)
    s7 = GenericTestEnv()
    await s7.reset(seed=7)
    assert s7.np_random.bit_generator.state != a.np_random.bit_generator.state


async def test_multi_agent_misuse_errors():
    env = GenericMultiAgentEnv(["x", "y"])
    with pytest.raises(ResetNeeded):
        await env.step({"x": "a"})
    obs, _ = await env.reset(seed=0)
    assert list(obs) == ["x"] and env.agents_to_act == frozenset({"x"})
    with pytest.raises(UnknownAgent, match=r"actions given for \['y'\]"):
        await env.step({"x": "a", "y": "b"})
    with pytest.raises(MissingAction, match=r"no action for \['x'\]"):
        await env.step({})
    with pytest.raises(TypeError, match="takes a dict"):
        await env.step("a")
    obs, *_ = await env.step({"x": "a"})
    assert list(obs) == ["y"]


async def test_multi_agent_episode_ends_when_no_agents():
    env = GenericMultiAgentEnv(["x", "y"], simultaneous=True, episode_length=2)
    obs, _ = await env.reset(seed=0)
    assert set(obs) == {"x", "y"}
    await env.step({"x": "a", "y": "b"})
    obs, rewards, terms, _, _ = await env.step({"x": "a", "y": "bb"})
    assert obs == {} and env.agents == [] and rewards == {"x": 1.0, "y": 0.0}
    assert terms == {"x": True, "y": True}
    with pytest.raises(ResetNeeded):
        await env.step({})


async def test_cancelled_step_leaves_env_usable():
    gate = asyncio.Event()

    class Slow(GenericTestEnv):
        async def step(self, action):
            await gate.wait()
            return [], 1.0, True, False, {}

    env = Slow()
    await env.reset(seed=0)
    task = asyncio.ensure_future(env.step("x"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    assert (await env.step("x"))[2] is True  # bookkeeping unchanged by the cancelled call


async def test_async_context_manager_and_repr():
    async with GenericTestEnv() as env:
        assert repr(env) == "<GenericTestEnv GenericTestEnv>"
    made = aa.make("Countdown-v0")
    assert "Countdown-v0" in repr(made)
    await made.close()
    await made.close()


async def test_action_rng_is_reseeded_by_reset_seed_only():
    """``action_rng`` (for ``sample_action``) restarts with ``reset(seed=s)`` on both env kinds
    and is left alone by ``reset()`` without a seed; it is separate from ``np_random``."""
    for env in (GenericTestEnv(), GenericMultiAgentEnv()):
        await env.reset(seed=7)
        first = [env.action_rng.random() for _ in range(3)]
        await env.reset(seed=7)
        assert [env.action_rng.random() for _ in range(3)] == first
        await env.reset()
        assert env.action_rng.random() != first[0]  # continues the stream, not reseeded
        np_state = env.np_random.bit_generator.state
        env.action_rng.random()
        assert env.np_random.bit_generator.state == np_state


async def test_action_rng_is_built_from_the_reset_seed_on_first_use():
    """``reset(seed=s)`` does not build ``action_rng`` (most episodes never use it); the first
    use gives ``random.Random(s)``'s stream, also after several seeded resets, and a reset
    without a seed keeps the pending seed."""
    import random

    env = GenericTestEnv()
    await env.reset(seed=3)
    assert env._action_rng is None
    await env.reset(seed=11)
    await env.reset()
    assert [env.action_rng.random() for _ in range(3)] == env_stream(11)
    rng = env.action_rng
    await env.reset(seed=5)  # built: reseeded in place, as before
    assert env.action_rng is rng and env.action_rng.random() == random.Random(5).random()


def env_stream(seed: int) -> list[float]:
    import random

    r = random.Random(seed)
    return [r.random() for _ in range(3)]
