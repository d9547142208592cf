"""``POST /v1/responses`` (what OpenAI's Agents SDK sends by default): text and function
tools on the chat path; turns recorded per session and merged by the tokenization contract."""

from __future__ import annotations

import httpx2
import openai
import pytest

from areal_agents.gateway import Gateway
from areal_agents.gateway.responses import to_chat_body
from areal_agents.testing.engine import ScriptedEngine

ADMIN = "admin"
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
TOOLS = [{"type": "function", "name": "add", "description": "Add two integers.", "strict": True,
          "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                          "b": {"type": "integer"}},
                         "required": ["a", "b"], "additionalProperties": False}}]


@pytest.fixture
async def gw(tok):
    gw = Gateway(admin_key=ADMIN)
    gw.add_policy("tiny", [ScriptedEngine([CALL, "It is 5."], tokenizer=tok)], tok)
    yield gw
    await gw.close()


def _client(gw: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key=key, max_retries=0,
                              http_client=httpx2.AsyncClient(
                                  transport=httpx2.ASGITransport(app=gw.app)))


def test_input_items_become_chat_messages_with_calls_joined_to_the_assistant_turn():
    body = to_chat_body({
        "model": "p", "instructions": "Use tools.", "temperature": 0.5,
        "max_output_tokens": 7, "store": False, "include": [], "truncation": "disabled",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "2 + 3?"}]},
            {"type": "message", "role": "assistant", "id": "m", "status": "completed",
             "content": [{"type": "output_text", "text": "Let me add.", "annotations": []}]},
            {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{}"},
            {"type": "reasoning", "id": "r", "summary": []},
            {"type": "function_call_output", "call_id": "c1", "output": "5"}],
        "tools": TOOLS, "tool_choice": {"type": "function", "name": "add"}})
    assert body["messages"] == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "Let me add.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    assert body["tools"] == [{"type": "function", "function": {
        "name": "add", "description": "Add two integers.", "parameters": TOOLS[0]["parameters"]}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert (body["temperature"], body["max_tokens"]) == (0.5, 7)


async def test_function_tool_round_trip_is_recorded_as_one_merged_sample(gw):
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app), base_url="http://gw",
                              headers={"Authorization": f"Bearer {ADMIN}"})
    opened = (await http.post("/rl/sessions", json={"policy": "tiny"})).json()
    client = _client(gw, opened["api_key"])
    first = await client.responses.create(model="tiny", instructions="Use tools.",
                                          input="2 + 3?", tools=TOOLS, store=False)
    [call] = first.output
    assert (call.type, call.name, call.arguments) == ("function_call", "add",
                                                      '{"a": 2, "b": 3}')
    assert first.status == "completed" and first.usage.output_tokens > 0
    items = [{"role": "user", "content": "2 + 3?"}, *[o.model_dump() for o in first.output],
             {"type": "function_call_output", "call_id": call.call_id, "output": "5"}]
    second = await client.responses.create(model="tiny", instructions="Use tools.",
                                           input=items, tools=TOOLS, store=False)
    assert second.output_text == "It is 5."
    r = await http.post(f"/rl/sessions/{opened['session_id']}/reward",
                        json={"reward": 1.0, "completion_id": second.id})
    assert r.json()["turn_rewards"] == {"1": 1.0}
    session = gw.session(opened["api_key"])
    assert [t.prefix_turn for t in session.turns] == [None, 0]  # the second extends the first
    samples, report = session.to_samples()
    assert len(samples) == 1 and report.num_splits == 0
    assert samples[0].num_generated == sum(len(t.completion_ids) for t in session.turns)
    await client.close()
    await http.aclose()


async def test_an_empty_reply_is_an_empty_message_and_a_cut_one_is_incomplete(tok):
    gw = Gateway(admin_key=ADMIN)
    gw.add_policy("tiny", [ScriptedEngine([[tok.eos_token_id], "one two three"],
                                          tokenizer=tok)], tok)
    client = _client(gw, ADMIN)
    empty = await client.responses.create(model="tiny", input="hi")
    cut = await client.responses.create(model="tiny", input="hi", max_output_tokens=1)
    assert [(o.type, o.content[0].text) for o in empty.output] == [("message", "")]
    assert empty.status == "completed"  # the Agents SDK takes it as the final output
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 1
    await client.close()
    await gw.close()


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id",
     "send the whole conversation"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input", "only text content parts"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input", "served item types"),
    ({"input": []}, "input", "non-empty list"),
])
async def test_what_is_not_served_is_a_400_naming_the_fix(gw, body, param, says):
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app),
                                  base_url="http://gw",
                                  headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        r = await http.post("/v1/responses", json={"model": "tiny", **body})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and says in error["message"]
    assert r.headers["x-should-retry"] == "false"
