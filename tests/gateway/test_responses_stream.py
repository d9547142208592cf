"""``POST /v1/responses`` with ``stream: true``: the Responses event stream, read by OpenAI's
Agents SDK itself (``Runner.run_streamed``) through a function-tool round trip; the streamed
turns are recorded like unstreamed ones (before: 400 "streaming is not served")."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import httpx2
import openai
import pytest

from areal_agents.gateway import Gateway
from areal_agents.testing.engine import ScriptedEngine

ROOT = Path(__file__).resolve().parents[2]
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


def _sdk_installed() -> bool:
    try:
        importlib.metadata.version("openai-agents")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture
def sdk(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples/proxy"))
    from proxy_driver import agents_sdk  # the SDK past the repository's agents/ folder

    return agents_sdk()


async def test_the_event_stream_is_in_order_and_the_turn_is_recorded(tok):
    gw = Gateway(admin_key="admin")
    gw.add_policy("tiny", [ScriptedEngine(["It is 5."], tokenizer=tok)], tok)
    key = await gw.create_session("tiny")
    client = openai.AsyncOpenAI(base_url="http://gw/v1", api_key=key, max_retries=0,
                                http_client=httpx2.AsyncClient(
                                    transport=httpx2.ASGITransport(app=gw.app)))
    stream = await client.responses.create(model="tiny", input="2 + 3 =", stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(9))
    assert events[4].delta == "It is 5." and events[0].response.status == "in_progress"
    done = events[-1].response
    assert done.output_text == "It is 5." and done.status == "completed"
    [turn] = gw.session(key).turns
    assert turn.request_id == done.id and tok.decode(turn.completion_ids).startswith("It is 5.")
    await client.close()
    await gw.close()


@pytest.mark.skipif(not _sdk_installed(), reason="needs openai-agents (the agents_sdk extra)")
async def test_the_agents_sdk_runs_streamed_with_a_function_tool(tok, sdk):
    gw = Gateway(admin_key="admin")
    gw.add_policy("tiny", [ScriptedEngine([CALL, "It is 5."], tokenizer=tok)], tok)
    key = await gw.create_session("tiny")
    client = openai.AsyncOpenAI(base_url="http://gw/v1", api_key=key, max_retries=0,
                                http_client=httpx2.AsyncClient(
                                    transport=httpx2.ASGITransport(app=gw.app)))

    @sdk.function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    sdk.set_tracing_disabled(True)
    agent = sdk.Agent(name="calc", instructions="Use tools.", tools=[add],
                      model=sdk.OpenAIResponsesModel(model="tiny", openai_client=client))
    result = sdk.Runner.run_streamed(agent, "2 + 3 =")
    kinds = [e.type async for e in result.stream_events()]
    assert result.final_output == "It is 5."
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    session = gw.session(key)
    assert len(session.turns) == 2  # the call, then the answer after the tool's output
    assert "<|im_start|>tool\n5<|im_end|>" in tok.decode(session.turns[1].prompt_ids)
    [sample], _ = session.to_samples(reward=1.0)
    assert sample.meta["turns"] == [0, 1]  # merged by the tokenization contract
    await client.close()
    await gw.close()
