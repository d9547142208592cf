"""Opponent pools in the Trainer: per-seed draws, untrained opponent seats, snapshots with
eviction, resume, evaluation against named opponents and the league matrix."""

from __future__ import annotations

import json

import pytest
import torch

from areal_agents.errors import ConfigError
from areal_agents.league import OpponentPool
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

ONE_TOKEN = {"temperature": 1.0, "max_tokens": 1}


def make_trainer(run_dir=None, resume=False, eval_every=0, **pool_kw) -> Trainer:
    pool = {"members": ["heuristic", "random"], "snapshot_every": 1, "max_snapshots": 2,
            "sampling": "pfsp", "league_seeds": [7, 8]} | pool_kw
    return Trainer(env="TicTacToe-v0", env_kwargs={"illegal": "reask"},
                   policies={"p": Policy(lr=1e-3, api="completions", sampling=dict(ONE_TOKEN))},
                   policy_map={"x": "p", "o": "p"}, batch_size=2, group_size=2, progress=False,
                   opponents=OpponentPool(**pool), run_dir=run_dir, resume=resume,
                   checkpoint_every=2 if run_dir else 0, eval_every=eval_every, eval_seeds=[1])


def test_pool_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="OpponentPool is empty"):
        OpponentPool()
    with pytest.raises(ConfigError, match=r"OpponentPool.sampling='elo'"):
        OpponentPool(members=["heuristic"], sampling="elo")
    with pytest.raises(ConfigError, match=r"opponent 'nobody' matches no scripted players"):
        make_trainer(members=["nobody"])
    with pytest.raises(ConfigError, match=r"OpponentPool.seat='z': choose 'any' or an agent"):
        make_trainer(seat="z")
    with pytest.raises(ConfigError, match=r"policy 'q' is trainable; pool members are frozen"):
        Trainer(env="TicTacToe-v0", policies={"p": Policy(), "q": Policy()},
                policy_map={"x": "p", "o": "p"}, batch_size=2, group_size=2,
                opponents=OpponentPool(members=["q"]))


def test_draws_are_keyed_by_task_seed_and_cover_seats_and_members():
    trainer = make_trainer(snapshot_every=0, members=["heuristic", "random", "minimax"],
                           sampling="uniform")
    env = trainer.make_env()
    seen = set()
    for seed in range(60):
        first = trainer.league.match(trainer, seed, env)
        again = trainer.league.match(trainer, seed, env)  # another member of the same group
        assert (first.opponent_seat, first.member) == (again.opponent_seat, again.member)
        assert first.opponent_seat not in first.policy_of
        assert set(first.policy_of) | set(first.fixed_agents) == {"x", "o"}
        first.close(), again.close()
        seen.add((first.opponent_seat, first.member))
    assert len(seen) == 6  # both seats x three members


async def test_pool_training_snapshots_evicts_and_never_trains_the_opponent(tmp_path):
    trainer = make_trainer(tmp_path, league_every=2, seat="o", eval_every=1)
    try:
        await trainer.setup()
        assert trainer.league.snapshots == ["p@0"]
        for seed in range(4):  # every trained sample comes from the learner's seat
            samples = await trainer._episode(seed, 0)
            assert {s.agent for s in samples.get("p", [])} <= {"x"}
        history = await trainer.afit(2)
        assert trainer.league.snapshots == ["p@1", "p@2"]  # p@0 evicted (max_snapshots=2)
        assert "p@0" not in trainer.gateway.policies and "p@0" not in trainer.policies
        assert not any(k.startswith("train/o/") for k in history[-1])  # opponent seat: no stats
        served = trainer.gateway.policies["p@2"].router.engines[0].model
        for name, tensor in trainer.train_engines["p"].export_weights():
            assert torch.equal(served.state_dict()[name], tensor), name
        assert (tmp_path / "league" / "snapshots" / "p@2.pt").exists()

        vs = await trainer.evaluate([1, 2, 3], opponents=["heuristic", "p@1"], seats=["o"])
        for opp in ("heuristic", "p@1"):
            rates = [vs[f"eval/x/vs/{opp}/{o}"] for o in ("win", "draw", "loss")]
            assert sum(rates) == pytest.approx(1.0) and all(r in (0, 1 / 3, 2 / 3, 1)
                                                           for r in rates)
        assert not any("/o/vs/" in k for k in vs)

        league = await trainer.league.play_league(trainer, ["p", "heuristic", "random"], [5, 6, 7])
        m = league["matrix"]
        for a, b in (("p", "heuristic"), ("heuristic", "random"), ("p", "random")):
            assert m[a][b]["games"] == 6 and m[a][b]["win"] == m[b][a]["loss"]
            assert m[a][b]["draw"] == m[b][a]["draw"]
        assert m["heuristic"]["random"]["win"] > m["heuristic"]["random"]["loss"]
        assert league["elo"]["heuristic"] > league["elo"]["random"]
        logged = json.loads((tmp_path / "league" / "step_2.json").read_text())
        assert logged["players"] == ["p", "p@1", "p@2", "heuristic", "random"]
        assert any(k == "league/p@2/elo" for k in history[-1])
    finally:
        await trainer.aclose()


async def test_resume_serves_the_pool_snapshots_again(tmp_path):
    trainer = make_trainer(tmp_path, seat="o")
    try:
        await trainer.afit(2)
        saved = json.loads((tmp_path / "checkpoints" / "step_2" / "trainer_state.json").read_text())
        records = saved["league"]["records"]  # episodes in flight after the save count later
        assert saved["league"]["snapshots"] == ["p@1", "p@2"]
        weights = trainer.gateway.policies["p@1"].router.engines[0].model.state_dict()
    finally:
        await trainer.aclose()
    resumed = make_trainer(tmp_path, resume=True, seat="o")
    try:
        await resumed.setup()
        assert resumed.step == 2 and resumed.league.snapshots == ["p@1", "p@2"]
        assert resumed.league.state_dict()["records"] == records
        again = resumed.gateway.policies["p@1"].router.engines[0].model.state_dict()
        assert all(torch.equal(weights[k], again[k]) for k in weights)
        assert "p@0" not in resumed.gateway.policies
    finally:
        await resumed.aclose()


def test_pool_config_mirrors_the_opponent_pool_dataclass():
    import dataclasses

    from areal_agents.config import OpponentPoolConfig

    pool = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING
                     else f.default) for f in dataclasses.fields(OpponentPool)}
    pool["league_seeds"] = list(pool["league_seeds"])
    config = {n: (f.default_factory() if f.default_factory is not None else f.default)
              for n, f in OpponentPoolConfig.model_fields.items()}
    assert config == pool


def test_yaml_pool_train_then_eval_against_named_opponents_and_seats(tmp_path, capsys):
    import yaml

    from areal_agents.cli import main

    config = {"env": "TicTacToe-v0", "env_kwargs": {"illegal": "reask"},
              "policies": {"p": {"lr": 1e-3, "api": "completions", "sampling": ONE_TOKEN}},
              "policy_map": {"x": "p", "o": "p"},
              "opponents": {"members": ["heuristic", "random"], "snapshot_every": 1,
                            "sampling": "latest"},
              "trainer": {"batch_size": 2, "group_size": 2, "steps": 1, "eval_seeds": [1, 2]},
              "logging": {"tensorboard": False, "progress": False}}
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert main(["train", str(path), f"run_dir={run_dir}"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--opponent", "heuristic", "--opponent", "p@1",
                 "--seat", "o"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert sorted(metrics) == sorted(f"eval/x/vs/{opp}/{k}" for opp in ("heuristic", "p@1")
                                     for k in ("win", "draw", "loss", "reward"))
    assert main(["eval", str(run_dir), "--opponent", "pool"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {k.rsplit("/", 1)[0] for k in metrics} == {
        f"eval/{s}/vs/{o}" for s in ("x", "o") for o in ("heuristic", "random")}
    assert main(["eval", str(run_dir), "--seat", "o"]) == 2
    assert "give --opponent NAME too" in capsys.readouterr().err
