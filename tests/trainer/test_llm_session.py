"""The trainer's seats: SessionAgent (an LLMAgent) on a recorded session, raw-text prompts,
per-turn seeds; the samples are taken from the gateway, not from the agent."""

from __future__ import annotations

import areal_agents as aa
from areal_agents.agents.llm import LLMAgent
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.llm_session import open_seat, raw_prompt, turn_seed
from areal_agents.trainers.policy import Policy


def test_turn_seed_is_stable_and_distinct():
    assert turn_seed("0/5/1/speaker", 0) == turn_seed("0/5/1/speaker", 0)
    seeds = {turn_seed(f"0/{s}/{m}/a", t) for s in range(5) for m in range(3) for t in range(3)}
    assert len(seeds) == 45 and all(0 <= x < 2**62 for x in seeds)
    assert turn_seed("k", 1) != turn_seed("k", 2) and turn_seed("k", 1) != turn_seed("j", 1)


async def test_session_agent_seeds_each_turn_and_records_exact_samples():
    _model, tokenizer = aa.models.tiny("xs", seed=0)
    engine = ScriptedEngine(["1", "2"], tokenizer=tokenizer)
    gateway = aa.Gateway()
    gateway.add_policy("p", [engine], tokenizer)
    client = gateway.async_client()
    policy = Policy(api="completions", sampling={"temperature": 1.0, "max_tokens": 1})
    seat = await open_seat(gateway, client, policy, "p", "speaker", seed_key="0/7/1/speaker")
    agent = seat.agent
    assert isinstance(agent, LLMAgent)
    agent.reset()  # run_episode resets agents: the session opened up front stays
    first = await agent.act([{"role": "user", "content": "target: A"}])
    second = await agent.act([{"role": "user", "content": "again: B"}])
    assert (first["content"], second["content"]) == ("1", "2")
    assert [r.sampling.seed for r in engine.requests] == [turn_seed("0/7/1/speaker", 0),
                                                          turn_seed("0/7/1/speaker", 1)]
    prompt = tokenizer(raw_prompt(agent.history[:-1]))["input_ids"]
    assert engine.requests[1].prompt_ids == prompt  # raw text, no chat template
    assert await agent.end_episode(1.0) == []  # the agent only acts: the session stays open
    samples = seat.take_samples(reward=1.0, group="7")
    assert samples and samples[-1].token_ids[: len(prompt)] == prompt
    assert (samples[-1].reward, samples[-1].agent, samples[-1].policy, samples[-1].group) == (
        1.0, "speaker", "p", "7")
    assert gateway._sessions == {} and seat.take_samples(reward=1.0, group="7") == []
    greedy = await open_seat(gateway, client, policy, "p", "speaker", greedy=True,
                             seed_key="0/7/1/speaker")
    await greedy.agent.act("hi")  # the shared client still works: nothing closed it
    assert engine.requests[-1].sampling.temperature == 0 and engine.requests[-1].sampling.seed is None
    greedy.close()
    greedy.close()  # idempotent
    assert gateway._sessions == {}
    await gateway.close()
