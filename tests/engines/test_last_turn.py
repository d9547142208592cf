"""``GenerateRequest.last_turn``: a request no follow-up continues skips the prefix-cache copy
of its rows, with the same tokens and log-probs bit for bit; single-turn sessions (the
trainer's one-step completions path) send it, every other session does not."""

from __future__ import annotations

import asyncio

import pytest
import torch

import areal_agents as aa
from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.scheduler import RunningBatch
from areal_agents.models import tiny
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.llm_session import open_seat
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

PROMPTS = [[10 + p, 11, 12, 13, 14, 15 + p, 16] for p in range(8)]  # 8 prompts, shared head


@pytest.fixture
def model_tok():
    torch.set_num_threads(1)
    return tiny("xs", seed=0)


@pytest.fixture
def copies(monkeypatch):
    """How many rows ``RunningBatch`` copied out for the prefix cache."""
    counted = {"rows": 0}
    rows_kv, row_kv = RunningBatch.rows_kv, RunningBatch.row_kv

    def count_rows(self, rows, length):
        counted["rows"] += len(rows) if len(rows) > 1 else 0  # one row: row_kv counts it
        return rows_kv(self, rows, length)

    def count_row(self, row, length=None):
        counted["rows"] += 1
        return row_kv(self, row, length)

    monkeypatch.setattr(RunningBatch, "rows_kv", count_rows)
    monkeypatch.setattr(RunningBatch, "row_kv", count_row)
    return counted


async def _batch(engine: LocalEngine, last_turn: bool) -> list[tuple]:
    """A GRPO-like step: 8 sessions of 4 seeded samples each, all in one batch."""
    requests = [GenerateRequest(p, SamplingParams(max_tokens=6, temperature=1.0, seed=s, n=4),
                                session_id=f"s{s}", last_turn=last_turn)
                for s, p in enumerate(PROMPTS)]
    results = await asyncio.gather(*(engine.generate(r) for r in requests))
    return [(o.token_ids, o.logprobs, o.versions, o.finish_reason)
            for r in results for o in r.outputs]


async def test_last_turn_skips_the_copy_with_identical_tokens_and_logprobs(model_tok, copies):
    model, tok = model_tok
    async with LocalEngine(model, tok) as engine:
        kept = await _batch(engine, last_turn=False)
        kept_rows, kept_entries = copies["rows"], len(engine._prefix_cache)
    copies["rows"] = 0
    async with LocalEngine(model, tok) as engine:
        skipped = await _batch(engine, last_turn=True)
        assert (copies["rows"], len(engine._prefix_cache)) == (0, 0)
    assert (kept_rows, kept_entries) == (32, 8)  # every row copied; one entry per session
    assert skipped == kept  # token ids, log-probs (exact floats), versions, finish reasons


async def test_a_follow_up_after_a_last_turn_works_without_reuse(model_tok):
    model, tok = model_tok
    sp = SamplingParams(max_tokens=4, temperature=0.0)
    async with LocalEngine(model, tok) as engine:
        first = await engine.generate(GenerateRequest(PROMPTS[0], sp, session_id="s",
                                                      last_turn=True))
        follow_up = PROMPTS[0] + first.outputs[0].token_ids + [3, 4]
        second = await engine.generate(GenerateRequest(follow_up, sp, session_id="s"))
        assert engine.prefill_counts.reused == 0
    async with LocalEngine(model, tok, prefix_cache_tokens=0) as plain:
        await plain.generate(GenerateRequest(PROMPTS[0], sp))
        again = await plain.generate(GenerateRequest(follow_up, sp))
    assert second.outputs[0].token_ids == again.outputs[0].token_ids
    assert second.outputs[0].logprobs == again.outputs[0].logprobs


@pytest.mark.parametrize("single_turn", [False, True])
async def test_single_turn_sessions_send_last_turn(single_turn):
    _model, tokenizer = tiny("xs", seed=0)
    engine = ScriptedEngine(["1"], tokenizer=tokenizer)
    gateway = aa.Gateway()
    gateway.add_policy("p", [engine], tokenizer)
    seat = await open_seat(gateway, gateway.async_client(), Policy(api="completions"), "p", "a",
                           single_turn=single_turn)
    await seat.agent.act([{"role": "user", "content": "2 + 3 = ?"}])
    assert gateway.session(seat.key).single_turn is single_turn
    assert [r.last_turn for r in engine.requests] == [single_turn]
    await gateway.close()


@pytest.mark.parametrize(("max_steps", "api", "single_turn"), [
    (1, "completions", True),
    (None, "completions", False),  # the env decides: maybe several turns
    (2, "completions", False),
    (1, "chat", False),  # chat agents may take tool rounds within one step
])
async def test_the_trainer_marks_seats_single_turn_only_for_one_step_completions(
        max_steps, api, single_turn):
    trainer = Trainer(env="Arithmetic-v0", policies={"p": Policy(model="tiny:xs", api=api)},
                      policy_map={"agent": "p"}, batch_size=2, group_size=2, progress=False,
                      max_steps_per_episode=max_steps)
    try:
        await trainer.setup()
        seat = await trainer._open_seat("agent", "p", greedy=True)
        assert trainer.gateway.session(seat.key).single_turn is single_turn
        seat.close()
    finally:
        await trainer.aclose()
