"""state_dict seams: algorithm objects and the Trainer hand their state to checkpointing,
which only writes and reads files (JSON, RNG, the engines' own save/load)."""

from __future__ import annotations

import json

import pytest

from areal_agents.agents import ScriptedAgent
from areal_agents.algorithms import GRPO, RLOO
from areal_agents.trainers.checkpointing import load_checkpoint, save_checkpoint
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer


class FileEngine:
    """A TrainEngine stand-in whose save/load write and read one file (its version)."""

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self.loaded: list[str] = []

    def save(self, path: str) -> None:
        import os

        os.makedirs(path)
        with open(os.path.join(path, "version"), "w") as f:
            f.write(str(self.version))

    def load(self, path: str) -> None:
        with open(f"{path}/version") as f:
            self.version = int(f.read())
        self.loaded.append(path)


def _state(step: int = 3) -> dict:
    return {"step": step, "controller": {"cursor": 7, "done": [9], "ledger": {"p": {"trained": 8}},
                                         "controls": {"p": {"version": step}},
                                         "unresolved": {"p": 2}},
            "history": [{"step": 1.0}], "trained_seeds": [[0, 1]],
            "algorithms": {"p": {"ema_baselines": {"speaker": 0.25}}}}


def test_algorithm_state_dict_round_trips_the_ema_baselines():
    algo = RLOO(baseline="ema", ema_decay=0.5)
    algo.ema_baselines = {"p": 2.0, "q": 5.0}
    state = json.loads(json.dumps(algo.state_dict()))
    assert state == {"ema_baselines": {"p": 2.0, "q": 5.0}}
    fresh = RLOO(baseline="ema", ema_decay=0.5)
    fresh.load_state_dict(state)
    assert fresh.ema_baselines == {"p": 2.0, "q": 5.0}
    assert fresh.ema_baselines is not algo.ema_baselines
    fresh.load_state_dict({})
    assert fresh.ema_baselines == {}
    with pytest.raises(ValueError, match=r"RLOO.load_state_dict: unknown keys \['ema'\]; "
                                         "expected only 'ema_baselines'"):
        fresh.load_state_dict({"ema": {}})


async def test_checkpoint_files_round_trip_a_state_without_a_trainer(tmp_path):
    engines = {"p": FileEngine(version=3)}
    ckpt = await save_checkpoint(tmp_path, _state(), engines, keep=1)
    assert ckpt == tmp_path / "checkpoints" / "step_3"
    assert sorted(p.name for p in ckpt.iterdir()) == ["p", "rng.pt", "trainer_state.json"]
    await save_checkpoint(tmp_path, _state(step=4), engines, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_4"]

    other = {"p": FileEngine()}
    state = await load_checkpoint(tmp_path / "checkpoints" / "step_4", other)
    assert state == _state(step=4)
    assert other["p"].version == 3 and other["p"].loaded == [str(ckpt.with_name("step_4") / "p")]


@pytest.mark.parametrize("legacy, want", [
    ({"ema_baselines": {"a": 1.0}, "per_policy": {"q": {"b": 2.0}}},
     {"p": {"ema_baselines": {"a": 1.0}}, "q": {"ema_baselines": {"b": 2.0}}}),
    ({"a": 1.0}, {"p": {"ema_baselines": {"a": 1.0}}, "q": {"ema_baselines": {"a": 1.0}}}),
])
async def test_checkpoints_written_before_state_dicts_still_load(tmp_path, legacy, want):
    """The older ``algorithm`` entry (shared EMA + per-policy overrides, or the bare EMA dict)
    becomes one ``algorithms`` entry per policy."""
    ckpt = tmp_path / "step_1"
    state = {k: v for k, v in _state(1).items() if k != "algorithms"}
    (ckpt / "p").mkdir(parents=True)
    (ckpt / "q").mkdir()
    for name in ("p", "q"):
        (ckpt / name / "version").write_text("1")
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "algorithm": legacy}))
    loaded = await load_checkpoint(ckpt, {"p": FileEngine(), "q": FileEngine()})
    assert loaded["algorithms"] == want and "algorithm" not in loaded


def _trainer(run_dir):
    policies = {"speaker": Policy(lr=1e-3, sampling={"temperature": 1.0, "max_tokens": 1},
                                  algorithm_params={"ema_decay": 0.5}),
                "listener": Policy(lr=1e-3, seed=1,
                                   sampling={"temperature": 1.0, "max_tokens": 1})}
    return Trainer(env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
                   policies=policies, policy_map={"speaker": "speaker", "listener": "listener"},
                   algorithm=GRPO(baseline="ema"), batch_size=4, group_size=2, run_dir=run_dir,
                   progress=False)


async def test_trainer_state_dict_round_trips_through_json(tmp_path):
    first, second = _trainer(tmp_path / "a"), _trainer(tmp_path / "b")
    try:
        await first.setup()
        await second.setup()
        assert first.algorithms["speaker"] is not first.algorithm  # its own (overridden) object
        assert first.algorithms["listener"] is first.algorithm
        first.algorithms["speaker"].ema_baselines = {"speaker": 0.5}
        first.algorithms["listener"].ema_baselines = {"listener": -1.0}
        first.step, first.history, first.trained_seeds = 2, [{"step": 1}, {"step": 2}], [[0], [1]]
        first.controller.controls["speaker"].set_version(2)
        first.controller.controls["listener"].set_version(2)
        state = first.state_dict()
        assert state["algorithms"] == {"speaker": {"ema_baselines": {"speaker": 0.5}},
                                       "listener": {"ema_baselines": {"listener": -1.0}}}
        second.load_state_dict(json.loads(json.dumps(state)))
        assert second.step == 2 and second.history == first.history
        assert second.trained_seeds == [[0], [1]]
        assert second.algorithms["speaker"].ema_baselines == {"speaker": 0.5}
        assert second.algorithm.ema_baselines == {"listener": -1.0}
        assert {n: e.version for n, e in second.train_engines.items()} == {"speaker": 2,
                                                                           "listener": 2}
        again = second.state_dict()  # the same but for the rebased staleness counters
        assert {k: v for k, v in again.items() if k != "controller"} == {
            k: v for k, v in state.items() if k != "controller"}
        assert again["controller"]["ledger"] == state["controller"]["ledger"]
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_custom_algorithm_without_state_is_checkpointed_without_one(tmp_path):
    """Only algorithm objects with ``state_dict``/``load_state_dict`` contribute state."""

    class Plain:
        """A custom algorithm object (its training methods are not needed here)."""

    trainer = Trainer(env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
                      policies={"speaker": Policy(sampling={"max_tokens": 1})},
                      policy_map={"speaker": "speaker"},
                      agents={"listener": ScriptedAgent(lambda o: "A")}, algorithm=Plain(),
                      batch_size=2, group_size=2, progress=False)
    try:
        await trainer.setup()
        assert trainer.state_dict()["algorithms"] == {}
    finally:
        await trainer.aclose()
