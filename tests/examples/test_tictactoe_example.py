"""examples/tictactoe: the VsScripted arena, greedy W/D/L evaluation, and the three variants."""

from __future__ import annotations

import asyncio
import json

import pytest

from areal_agents.agents import ScriptedAgent
from areal_agents.agents.players import tictactoe_heuristic, tictactoe_minimax
from areal_agents.envs.tictactoe import TicTacToe
from areal_agents.episode import run_episode

from ._load import load_example

arena = load_example("tictactoe", "arena")
compare = load_example("tictactoe", "compare")


# ---- env pieces (no model) -------------------------------------------------------------------


async def test_opening_moves_vary_the_start_and_are_seeded():
    starts = set()
    for seed in range(20):
        env = TicTacToe(opening_moves=2)
        obs, _ = await env.reset(seed=seed)
        again, _ = await TicTacToe(opening_moves=2).reset(seed=seed)
        assert obs == again  # same seed, same opening
        ((first, _),) = obs.items()
        assert first == ("x" if env.board.count("X") == env.board.count("O") else "o")
        assert env.board.count(".") >= 7
        starts.add(env.board)
    assert len(starts) >= 8 and "." * 9 in starts
    assert (await TicTacToe().reset(seed=3))[0]["x"][0]["content"].endswith("...\n...\n...")
    with pytest.raises(ValueError, match=r"opening_moves must be in 0\.\.4"):
        TicTacToe(opening_moves=5)


async def test_list_free_names_the_empty_cells_before_the_board():
    env = TicTacToe(opening_moves=2, list_free=True)
    obs, _ = await env.reset(seed=5)
    text = obs["x"][0]["content"]
    assert env.board == "O......X."
    assert text.endswith("Opponent played 1. Free:2,3,4,5,6,7,9. You are X. Board:\nO..\n...\n.X.")
    obs, *_ = await env.step({"x": "5"})
    assert obs["o"][0]["content"].endswith("Opponent played 5. Free:2,3,4,6,7,9. You are O. "
                                           "Board:\nO..\n.X.\n.X.")
    assert tictactoe_heuristic(obs["o"]) == "2"  # scripted players still read the board: block
    plain, _ = await TicTacToe(opening_moves=2).reset(seed=5)
    assert "Free:" not in plain["x"][0]["content"]


def test_heuristic_wins_then_blocks_then_takes_the_centre():
    assert tictactoe_heuristic("You are X. Board:\nXX.\nOO.\n...") == "3"  # win first
    assert tictactoe_heuristic("You are X. Board:\nX..\nOO.\n..X") == "6"  # block
    assert tictactoe_heuristic("You are O. Board:\nX..\n...\n...") == "5"  # centre


async def play_vs(player, opponents, seats, seeds, opening_moves=2):
    outcomes = []
    for seed in seeds:
        env = arena.VsScripted(opponents, seats, opening_moves=opening_moves)
        episode = await run_episode(env, {"player": ScriptedAgent(player)}, seed=seed)
        info = episode.infos["player"]
        assert episode.status == "terminated"
        assert episode.returns["player"] == {"win": 1.0, "draw": 0.0, "loss": -1.0}[info["outcome"]]
        outcomes.append((info["seat"], info["opponent"], info["outcome"]))
    return outcomes


async def test_vs_scripted_draws_seat_and_opponent_per_seed():
    pool = ("random", "heuristic")
    for opening_moves in (0, 2):
        outcomes = await play_vs(tictactoe_minimax, pool, arena.SEATS, range(40), opening_moves)
        assert {(s, o) for s, o, _ in outcomes} == {(s, o) for s in "xo" for o in pool}
        assert any(outcome == "win" for *_, outcome in outcomes)
        assert outcomes == await play_vs(tictactoe_minimax, pool, arena.SEATS, range(40),
                                         opening_moves)  # seeded
    # from the empty board minimax never loses (random openings may hand it a lost position)
    outcomes = await play_vs(tictactoe_minimax, pool, arena.SEATS, range(40), 0)
    assert all(outcome != "loss" for *_, outcome in outcomes)


async def test_vs_scripted_illegal_move_is_a_loss_and_minimax_beats_nothing():
    (outcome,) = await play_vs(lambda obs: "no move", ("minimax",), ("o",), [0])
    assert outcome == ("o", "minimax", "loss")
    outcomes = await play_vs(tictactoe_minimax, ("minimax",), ("x",), range(5), 0)
    assert {o for *_, o in outcomes} <= {"draw", "win"}
    with pytest.raises(ValueError, match="unknown opponents"):
        arena.VsScripted(("nobody",))
    with pytest.raises(ValueError, match="seats"):
        arena.VsScripted(seats=("z",))


# ---- the variants (tiny model, a few steps) ---------------------------------------------------

# enough warm start that the first mover rarely loses by three illegal moves in a row before
# its seat-mate acts (a group where a policy never acts gives it no samples)
SMALL = dict(sft_steps=15, warm_episodes=16, batch_size=8, group_size=4)
SEEDS = [3_000_000, 3_000_001]


def check_rows(rows, policies, opponents, when):
    keys = {(r["policy"], r["seat"], r["opponent"]) for r in rows if r["when"] == when}
    assert keys == {(p, s, o) for p in policies for s in "xo" for o in opponents}
    for r in rows:
        assert r["games"] == len(SEEDS)
        for k in ("win", "draw", "loss", "illegal"):
            assert 0.0 <= r[k] <= 1.0 and (r[k] * len(SEEDS)).is_integer()
        assert r["win"] + r["draw"] + r["loss"] == pytest.approx(1.0)  # per policy and seat
        assert r["illegal"] <= r["loss"]


@pytest.mark.slow
async def test_selfplay_shares_one_parameter_set():
    result = await compare.run_variant("selfplay", 2, opponents=["heuristic"], seeds=SEEDS,
                                       before=True, **SMALL)
    assert result["train_engines"] == ["shared"] and list(result["parameters"]) == ["shared"]
    assert result["policy_of"] == {"x": "shared", "o": "shared"}
    check_rows(result["rows"], ["shared"], ["heuristic"], "sft")
    check_rows(result["rows"], ["shared"], ["heuristic"], "rl2")
    assert all(r["trained_seat"] for r in result["rows"])
    last = result["history"][-1]
    assert last["policy/shared/version"] == 2.0  # one engine, one update per step
    assert {"train/x/reward", "train/o/reward"} <= set(last)  # both seats feed it
    assert not any(k.startswith(("policy/px/", "policy/po/")) for k in last)


@pytest.mark.slow
async def test_separate_has_two_parameter_sets():
    result = await compare.run_variant("separate", 1, opponents=["random"], seeds=SEEDS,
                                       before=False, **SMALL)
    assert result["train_engines"] == ["po", "px"]
    assert result["policy_of"] == {"x": "px", "o": "po"}
    params = result["parameters"]
    assert set(params) == {"po", "px"} and params["po"] == params["px"] > 0
    check_rows(result["rows"], ["po", "px"], ["random"], "rl1")
    trained = {(r["policy"], r["seat"]) for r in result["rows"] if r["trained_seat"]}
    assert trained == {("px", "x"), ("po", "o")}
    last = result["history"][-1]
    assert last["policy/px/version"] == last["policy/po/version"] == 1.0


@pytest.mark.slow
async def test_pool_trains_one_policy_in_both_seats():
    pool = await compare.run_variant("pool", 1, opponents=["heuristic"], seeds=SEEDS,
                                     before=False, **SMALL)
    assert pool["train_engines"] == ["vs_pool"] and pool["policy_of"] == {"player": "vs_pool"}
    check_rows(pool["rows"], ["vs_pool"], ["heuristic"], "rl1")
    assert all(r["trained_seat"] for r in pool["rows"])


def test_table_and_errors():
    row = {"variant": "pool", "when": "rl1", "policy": "vs_pool", "seat": "o",
           "trained_seat": False, "opponent": "heuristic", "win": 0.25, "draw": 0.25,
           "loss": 0.5, "illegal": 0.5, "games": 4.0}
    text = compare.format_table([row])
    assert "O*" in text and "   25    25    50      50  4" in text
    with pytest.raises(ValueError, match="unknown variant"):
        compare.build("nope")
    with pytest.raises(ValueError, match="at least one seed"):
        asyncio.run(arena.evaluate_vs(None, "p", "random", "x", []))


# ---- train_pool.py: the OpponentPool run, at tiny size ----------------------------------------

train_pool = load_example("tictactoe", "train_pool")


def test_shaped_reward_and_wilson_interval():
    from areal_agents.episode import Episode

    fn = train_pool.shaped_reward(draw_bonus=0.5, illegal_penalty=1.0)

    def episode(info):
        return Episode(agents=["x", "o"], messages={}, rewards={}, returns={"x": 0.0, "o": 0.0},
                       length=5, status="terminated", infos={"x": info, "o": info})

    assert fn(episode({"winner": None, "board": "XOXXOOOXX"})) == {"x": 0.5, "o": 0.5}
    assert fn(episode({"illegal": "cell 1 is taken", "loser": "o"})) == {"x": 0.0, "o": -1.0}
    assert fn(episode({"winner": "x", "board": "XXX......"})) == {"x": 0.0, "o": 0.0}
    low, high = train_pool.wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert train_pool.wilson(200, 200)[1] == pytest.approx(1.0)


def test_results_are_written_without_a_league_folder(tmp_path):
    # --league-every 0: no league was played during training, so RUN_DIR/league/ did not exist
    # and writing final.json raised FileNotFoundError after the whole run
    train_pool.write_results(tmp_path / "run", {"elo": {"p": 1000.0}}, {"start": {}, "final": {}})
    assert json.loads((tmp_path / "run" / "league" / "final.json").read_text())["elo"] == {
        "p": 1000.0}
    assert set(json.loads((tmp_path / "run" / "result.json").read_text())) == {"start", "final"}


async def test_train_pool_runs_end_to_end_at_tiny_size(tmp_path, capsys):
    # one RL step between two evaluation points (step 0 and step 1), a snapshot every step;
    # run() without main()'s plots (half of this test's time; tests/test_league_plot.py)
    run_dir = tmp_path / "run"
    await train_pool.run(train_pool.parse_args([
        "--steps", "1", "--sft-steps", "1", "--warm-episodes", "4", "--batch-size", "2",
        "--group-size", "2", "--snapshot-every", "1", "--eval-every", "1", "--league-games", "1",
        "--eval-games", "1", "--run-dir", str(run_dir)]))
    result = json.loads((run_dir / "result.json").read_text())
    assert [p["step"] for p in result["curve"]] == [0, 1] and result["steps"] == 1
    assert json.loads((run_dir / "curve.json").read_text())[-1]["step"] == 1
    for when in ("start", "final"):
        counts = result[when]
        assert sum(counts[s][o] for s in ("x", "o") for o in ("win", "draw", "loss")) == 2
        low, high = counts["wilson95"]
        assert low <= counts["win_draw"] <= high
    final = json.loads((run_dir / "league" / "final.json").read_text())
    assert final["players"] == ["p", "p@0", "p@1", "heuristic", "random", "minimax"]
    assert sorted(final["elo"]) == sorted(final["players"]) == sorted(result["elo"])
    assert [p.name for p in sorted((run_dir / "league").glob("step_*.json"))] == [
        "step_0.json", "step_1.json"]
    out = capsys.readouterr().out
    assert "step 0: " in out and "step 1: " in out


def test_pool_yaml_builds_the_same_pool_as_train_pool():
    from pathlib import Path

    from areal_agents.config import load_config

    cfg = load_config(Path(train_pool.__file__).with_name("pool.yaml"), [])
    trainer = cfg.build()
    script = train_pool.build(train_pool.parse_args(["--run-dir", str(Path(cfg.run_dir))]))
    assert trainer.league.pool == script.league.pool
    env, script_env = trainer.make_env(), script.make_env()
    for name in ("opening_moves", "illegal", "list_free"):
        assert getattr(env, name) == getattr(script_env, name), name
    assert (trainer.batch_size, trainer.group_size) == (script.batch_size, script.group_size)
    assert trainer.policy_of == script.policy_of == {"x": "p", "o": "p"}
    for field in ("lr", "sft_steps", "sampling"):
        assert getattr(trainer.policies["p"], field) == getattr(script.policies["p"], field)
    assert trainer.league.seats == ["x", "o"]
    assert trainer.league.sources == script.league.sources == []  # run D: no snapshots
