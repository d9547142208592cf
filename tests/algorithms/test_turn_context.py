"""``Policy(context="last")``: each turn's prompt is the newest observation only, so each turn
is its own sample -- what turn-level credit (``group_by="turn"``) needs to differ from the
role-level one (a merged multi-turn sample counts as its first turn)."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.algorithms import GRPO
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.llm_session import open_seat
from areal_agents.trainers.policy import Policy


async def _samples(context: str):
    _model, tokenizer = aa.models.tiny("xs", seed=0)
    engine = ScriptedEngine(["1", "2", "3"], tokenizer=tokenizer)
    gateway = aa.Gateway()
    gateway.add_policy("p", [engine], tokenizer)
    policy = Policy(api="completions", context=context,
                    sampling={"temperature": 1.0, "max_tokens": 1})
    seat = await open_seat(gateway, gateway.async_client(), policy, "p", "x", seed_key="k")
    for obs in ("board A", "board B", "board C"):
        await seat.agent.act([{"role": "user", "content": obs}])
    samples = seat.take_samples(reward=1.0, group="7")
    prompts = [tokenizer.decode(r.prompt_ids) for r in engine.requests]
    await gateway.close()
    return samples, prompts


async def test_last_context_prompts_each_turn_alone_and_splits_the_samples():
    merged, full_prompts = await _samples("full")
    split, last_prompts = await _samples("last")
    assert [s.meta["turns"] for s in merged] == [[0, 1, 2]]
    assert [s.meta["turns"] for s in split] == [[0], [1], [2]]
    assert last_prompts == ["board A", "board B", "board C"]
    assert full_prompts[2].startswith("board A") and full_prompts[2].endswith("board C")
    # turn-level grouping now separates the turns; on the merged sample it cannot
    for s, r in zip(split, (1.0, 0.0, 2.0), strict=True):
        s.reward = r
    assert GRPO(std_normalize=False).advantages(split) == pytest.approx([0.0, -1.0, 1.0])
    assert GRPO(std_normalize=False, group_by="turn").advantages(split) == [0.0, 0.0, 0.0]


def test_an_unknown_context_is_refused():
    with pytest.raises(ValueError, match=r"Policy.context='window'; choose 'full' or 'last'"):
        Policy(context="window")  # type: ignore[arg-type]


def test_the_warm_start_shows_each_demo_as_the_last_context_agent_sees_it():
    from areal_agents.trainers.warm_start import warm_start_plan

    _model, tokenizer = aa.models.tiny("xs", seed=0)
    demo = [{"role": "system", "content": "play"}, {"role": "user", "content": "board A"},
            {"role": "assistant", "content": "1"}, {"role": "user", "content": "board B"},
            {"role": "assistant", "content": "2"}]
    plans = {c: warm_start_plan(Policy(api="completions", context=c, sft_steps=1), tokenizer,
                                [demo]) for c in ("full", "last")}
    prompts = {c: tokenizer.decode([t for t, m in zip(p.samples[0].token_ids,
                                                      p.samples[0].loss_mask, strict=True)
                                    if not m]) for c, p in plans.items()}
    assert prompts == {"full": "play\nboard A1\nboard B", "last": "play\nboard B"}


def test_the_tictactoe_yaml_trains_turn_level_credit_on_last_context_prompts():
    from pathlib import Path

    from areal_agents.config import load_config

    path = Path(__file__).parents[2] / "examples/tictactoe/turn_groups.yaml"
    trainer = load_config(path, ["trainer.warm_start=null"]).build()
    assert trainer.policies["p"].context == "last"
    assert trainer.algorithms["p"].group_by == "turn"
    role = load_config(path, ["trainer.warm_start=null", "algorithm.params.group_by=role"])
    assert role.build().algorithms["p"].group_by == "role"
