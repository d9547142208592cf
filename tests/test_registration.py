"""Registry: register/make/spec, did-you-mean, TimeLimit from max_episode_steps, entry points."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

import areal_agents as aa
from areal_agents import registration
from areal_agents.errors import RegistryError
from areal_agents.testing import GenericMultiAgentEnv, GenericTestEnv


class Hello(GenericTestEnv):
    """Says hello, for registry tests.

    More text that is not the description.
    """

    def __init__(self, greeting: str = "hi", **kwargs) -> None:
        super().__init__(**kwargs)
        self.greeting = greeting


@pytest.fixture
def fresh_ids():
    """Remove ids registered by a test afterwards."""
    ids: list[str] = []
    yield ids
    for env_id in ids:
        dict.pop(aa.registry, env_id, None)


def test_register_make_spec_roundtrip(fresh_ids):
    fresh_ids.append("TestHello-v0")
    spec = aa.register("TestHello-v0", Hello, greeting="hey")
    assert spec.description == "Says hello, for registry tests."
    assert spec.multi_agent is False
    assert aa.spec("TestHello-v0") is spec
    assert "TestHello-v0" in aa.registry
    env = aa.make("TestHello-v0")
    assert isinstance(env, Hello) and env.greeting == "hey"
    assert env.spec.id == "TestHello-v0" and env.spec.kwargs == {"greeting": "hey"}
    env2 = aa.make("TestHello-v0", greeting="yo", episode_length=2)
    assert env2.greeting == "yo" and env2.episode_length == 2
    assert env2.spec.kwargs == {"greeting": "yo", "episode_length": 2}
    rebuilt = env2.spec.make()
    assert rebuilt.greeting == "yo"


def test_string_entry_point_and_description_override(fresh_ids):
    fresh_ids.append("TestMulti-v0")
    spec = aa.register(
        "TestMulti-v0", "areal_agents.testing.envs:GenericMultiAgentEnv", description="two players"
    )
    assert spec.description == "two players"
    assert spec.multi_agent is True
    assert isinstance(aa.make("TestMulti-v0"), GenericMultiAgentEnv)


def test_duplicate_id_raises(fresh_ids):
    fresh_ids.append("TestDup-v0")
    aa.register("TestDup-v0", Hello)
    with pytest.raises(RegistryError, match="already registered"):
        aa.register("TestDup-v0", Hello)


def test_unknown_id_suggests_close_match(fresh_ids):
    fresh_ids.append("TestHello-v0")
    aa.register("TestHello-v0", Hello)
    with pytest.raises(RegistryError, match=r"did you mean 'TestHello-v0'\?"):
        aa.make("TestHelo-v0")
    with pytest.raises(RegistryError, match="no env registered with id 'zzz'") as info:
        aa.spec("zzz")
    assert "did you mean" not in str(info.value)


def test_bad_entry_point_string(fresh_ids):
    fresh_ids.append("TestBad-v0")
    aa.register("TestBad-v0", "no_colon_here")
    with pytest.raises(RegistryError, match="'module:Class'"):
        aa.make("TestBad-v0")


def test_factory_must_return_env(fresh_ids):
    fresh_ids.append("TestNotEnv-v0")
    aa.register("TestNotEnv-v0", lambda: object())
    with pytest.raises(RegistryError, match="expected an AgentEnv or MultiAgentEnv"):
        aa.make("TestNotEnv-v0")


async def test_max_episode_steps_wraps_in_time_limit(fresh_ids):
    fresh_ids.append("TestLimited-v0")
    aa.register("TestLimited-v0", Hello, max_episode_steps=2, episode_length=10)
    env = aa.make("TestLimited-v0")
    assert isinstance(env, aa.TimeLimit)
    assert env.spec.id == "TestLimited-v0" and env.unwrapped.spec.id == "TestLimited-v0"
    await env.reset(seed=0)
    assert (await env.step("a"))[3] is False
    assert (await env.step("a"))[3] is True


def _fake_distribution(tmp_path, name: str, entry_points: str) -> None:
    dist = tmp_path / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[areal_agents.envs]\n{entry_points}\n")


def test_entry_point_discovery(tmp_path, monkeypatch, fresh_ids):
    fresh_ids.extend(["PluginModule-v0", "PluginCallable-v0"])
    # a third-party distribution: a module that registers on import, and a registering callable
    (tmp_path / "fake_aa_plugin_mod.py").write_text(
        "import areal_agents as aa\n"
        "aa.register('PluginModule-v0', 'areal_agents.testing.envs:GenericTestEnv')\n"
    )
    (tmp_path / "fake_aa_plugin_fn.py").write_text(
        "import areal_agents as aa\n"
        "def register_all():\n"
        "    aa.register('PluginCallable-v0', 'areal_agents.testing.envs:GenericMultiAgentEnv')\n"
    )
    _fake_distribution(
        tmp_path,
        "fake_aa_plugin",
        "mod = fake_aa_plugin_mod\nfn = fake_aa_plugin_fn:register_all\n"
        "broken = not_a_module_anywhere_xyz",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("fake_aa_plugin_mod", "fake_aa_plugin_fn"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.invalidate_caches()
    names = {ep.name for ep in importlib.metadata.entry_points(group="areal_agents.envs")}
    assert {"mod", "fn", "broken"} <= names

    loaded = registration.load_entry_points()
    assert {"mod", "fn"} <= set(loaded)
    assert "broken" not in loaded  # logged, not raised
    assert aa.spec("PluginModule-v0").multi_agent is False
    assert aa.spec("PluginCallable-v0").multi_agent is True
    for name in ("fake_aa_plugin_mod", "fake_aa_plugin_fn"):
        sys.modules.pop(name, None)


def test_registry_loads_lazily_once(monkeypatch):
    calls = []
    monkeypatch.setattr(registration, "load_entry_points", lambda *a: calls.append(1) or [])
    monkeypatch.setattr(registration.registry, "_loaded", False)
    assert len(aa.registry) >= 0
    list(aa.registry)
    aa.registry.get("nothing")
    assert calls == [1]
