"""LLMAgent: history, local tools, retries; episodes through the gateway with per-agent samples."""

from __future__ import annotations

import asyncio
import json

import httpx2
import openai
import pytest

import areal_agents as aa
from areal_agents.agents.llm import LLMAgent
from areal_agents.gateway import Gateway
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.testing.openai_mock import OpenAIMock


@pytest.fixture(scope="module")
def tok():
    from areal_agents.models import tiny_tokenizer

    return tiny_tokenizer()


def call(name, args, call_id="c1"):
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


async def test_history_and_sampling_kwargs():
    mock = OpenAIMock(["one", "two"])
    agent = LLMAgent(mock.async_client(), "m", system_prompt="sys",
                     sampling={"temperature": 0.5, "max_tokens": 7})
    assert (await agent.act("a"))["content"] == "one"
    assert (await agent.act([{"role": "user", "content": "b"}]))["content"] == "two"
    assert [m["content"] for m in mock.requests[1]["messages"]] == ["sys", "a", "one", "b"]
    assert mock.requests[0]["temperature"] == 0.5 and mock.requests[0]["max_tokens"] == 7
    agent.reset()
    assert agent.history == []


async def test_env_tool_calls_are_returned_as_action():
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
    mock = OpenAIMock([{"tool_calls": [call("calculator", {"expression": "1+1"})]}])
    agent = LLMAgent(mock.async_client(), "m", tools=tools)
    action = await agent.act("go")
    assert action["tool_calls"][0]["function"]["name"] == "calculator"
    assert mock.requests[0]["tools"] == tools and len(mock.requests) == 1


async def test_local_tools_sync_async_errors_and_timeout():
    async def slow(x):
        await asyncio.sleep(5)

    def add(a, b):
        """Add two numbers."""
        return a + b

    mock = OpenAIMock([
        {"tool_calls": [call("add", {"a": 2, "b": 3}, "c1"), call("slow", {"x": 1}, "c2")]},
        {"tool_calls": [call("add", {"a": "x"}, "c3")]},
        "done",
    ])
    agent = LLMAgent(mock.async_client(), "m", tool_fns={"add": add, "slow": slow},
                     tool_timeout=0.05)
    reply = await agent.act("hi")
    assert reply["content"] == "done"
    tool_msgs = [m for m in agent.history if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == ["c1", "c2", "c3"]
    assert tool_msgs[0]["content"] == "5"
    assert "timed out" in tool_msgs[1]["content"]
    assert tool_msgs[2]["content"].startswith("error: TypeError")
    assert {t["function"]["name"] for t in mock.requests[0]["tools"]} == {"add", "slow"}


async def test_tool_rounds_are_bounded():
    mock = OpenAIMock([{"tool_calls": [call("add", {"a": 1, "b": 1})]}])
    agent = LLMAgent(mock.async_client(), "m", tool_fns={"add": lambda a, b: a + b},
                     max_tool_rounds=2)
    reply = await agent.act("loop")
    assert reply["tool_calls"] and len(mock.requests) == 3


async def test_retries_on_5xx_and_connection_errors_then_gives_up():
    mock = OpenAIMock([500, httpx2.ConnectError("refused"), "ok"])
    agent = LLMAgent(mock.async_client(), "m", max_attempts=3)
    assert (await agent.act("x"))["content"] == "ok"
    assert len(mock.requests) == 3
    mock = OpenAIMock([503])
    agent = LLMAgent(mock.async_client(), "m", max_attempts=2)
    with pytest.raises(openai.InternalServerError):
        await agent.act("x")
    assert len(mock.requests) == 2
    mock = OpenAIMock([400, "never"])  # client errors are not retried
    with pytest.raises(openai.BadRequestError):
        await LLMAgent(mock.async_client(), "m").act("x")
    assert len(mock.requests) == 1


def render(tok, history, tools):
    return tok.apply_chat_template(history, tools=tools or None, tokenize=False)


def check_samples(tok, agent, samples):
    """One merged sample whose ids decode to the agent's transcript, masks on replies only."""
    assert len(samples) == 1 and agent.last_report.num_splits == 0
    (s,) = samples
    assert tok.decode(s.token_ids) + "\n" == render(tok, agent.history, agent.tools)
    spans, cur = [], []
    for t, m in zip(s.token_ids, s.loss_mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    replies = [m for m in agent.history if m["role"] == "assistant"]
    assert len(spans) == len(replies)
    for span, reply in zip(spans, replies, strict=True):
        assert span[-1] == tok.eos_token_id
        text = tok.decode(span[:-1])
        if reply.get("tool_calls"):
            assert json.loads(reply["tool_calls"][0]["function"]["arguments"]) == json.loads(
                text.split('"arguments": ', 1)[1].rsplit("}</tool_call>", 1)[0])
        else:
            assert text == reply["content"]
    assert all(v == 0 for v, m in zip(s.versions, s.loss_mask, strict=True) if m)
    return s


async def test_calculator_five_turn_episode_through_gateway(tok):
    env = aa.make("Calculator-v0", max_turns=5)
    answer = {}

    def script(request, index):
        turns = sum(1 for r in engine.requests if r.session_id == request.session_id) - 1
        if turns < 4:
            return (f'<tool_call>{{"name": "calculator", "arguments": '
                    f'{{"expression": "{turns} + 1"}}}}</tool_call>')
        return f"Answer: {answer['value']}"

    engine = ScriptedEngine(script, tokenizer=tok)
    gw = Gateway()
    gw.add_policy("solver", [engine], tok)
    agent = LLMAgent.for_gateway(gw, "solver", tools=env.tools, agent_id="agent",
                                 system_prompt="Use tools.")
    _, info = await env.reset(seed=3)
    answer["value"] = info["answer"]
    episode = await aa.run_episode(env, agent, seed=3)
    assert episode.status == "terminated" and episode.length == 5
    assert episode.returns == {"agent": 1.0}
    (s,) = episode.samples["agent"]
    assert s.reward == 1.0 and s.agent == "agent" and s.policy == "solver"
    check_samples(tok, agent, [s])
    assert [m["content"] for m in agent.history if m["role"] == "tool"] == ["1", "2", "3", "4"]


async def test_tictactoe_two_agents_on_two_policies(tok):
    env = aa.make("TicTacToe-v0")
    moves = {"x": iter(["1", "2", "3"]), "o": iter(["4", "5"])}
    gw = Gateway()
    engines = {}
    for role in ("x", "o"):
        engines[role] = ScriptedEngine(lambda req, i, r=role: f"I play {next(moves[r])}",
                                       tokenizer=tok)
        gw.add_policy(f"pi_{role}", [engines[role]], tok)
    agents = {r: LLMAgent.for_gateway(gw, f"pi_{r}", agent_id=r) for r in ("x", "o")}
    episode = await aa.run_episode(env, agents, seed=0)
    assert episode.status == "terminated"
    assert episode.returns == {"x": 1.0, "o": -1.0}  # x completes the top row
    for role, agent in agents.items():
        s = check_samples(tok, agent, episode.samples[role])
        assert s.policy == f"pi_{role}" and s.reward == episode.returns[role]
    assert len(engines["x"].requests) == 3 and len(engines["o"].requests) == 2
    assert [m["content"] for m in episode.messages["x"] if m["role"] == "assistant"] == [
        "I play 1", "I play 2", "I play 3"]


async def test_agent_without_gateway_returns_no_samples():
    agent = LLMAgent(OpenAIMock(["x"]).async_client(), "m")
    await agent.act("a")
    assert await agent.end_episode(1.0) == []


async def test_tictactoe_real_tiny_models_on_two_policies():
    """Two LocalEngine policies (different seeds): per-agent samples decode to each agent's
    transcript, masks cover exactly the replies, and log-probs come from that agent's model."""
    import torch

    from areal_agents.engines.local import LocalEngine
    from areal_agents.models import tiny

    models = {}
    for seed in range(10, 30):  # the first episode seed where both players get to act
        gw = Gateway()
        for role, model_seed in (("x", 0), ("o", 1)):
            models[role], tok = tiny("xs", seed=model_seed)
            gw.add_policy(f"pi_{role}", [LocalEngine(models[role], tok, max_batch_size=4)], tok)
        agents = {r: LLMAgent.for_gateway(gw, f"pi_{r}", agent_id=r,
                                          sampling={"max_tokens": 3, "seed": seed})
                  for r in ("x", "o")}
        env = aa.make("TicTacToe-v0", illegal="reask", max_reasks=4)
        episode = await aa.run_episode(env, agents, seed=seed)
        if episode.samples["o"]:
            break
    assert episode.samples["o"], "no seed in 10..29 gave the second player a move"
    assert episode.status == "terminated"
    for role, agent in agents.items():
        (s,) = episode.samples[role]
        text, transcript = tok.decode(s.token_ids), render(tok, agent.history, None)
        # a length-truncated last reply has no generated <|im_end|>; the template adds it
        assert transcript in (text + "\n", text + "<|im_end|>\n")
        assert s.policy == f"pi_{role}" and s.reward == episode.returns[role]
        replies = [m for m in agent.history if m["role"] == "assistant"]
        assert s.num_generated == sum(
            len(t.completion_ids) for t in agent.last_session.turns)
        assert len(replies) == len(agent.last_session.turns)
        with torch.no_grad():
            logits = models[role](input_ids=torch.tensor([s.token_ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        gen = [i for i, m in enumerate(s.loss_mask) if m]
        expected = [logp[i - 1, s.token_ids[i]].item() for i in gen]
        assert [s.logprobs[i] for i in gen] == pytest.approx(expected, abs=1e-4)
