"""The official openai SDK against the gateway, in process and over a port (same tests)."""

from __future__ import annotations

import json

import openai
import pytest

from areal_agents.testing.engine import fake_logprob

MSGS = [{"role": "user", "content": "say hello"}]
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "add two ints",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}}}}}]


async def test_async_content_usage_and_token_ids(served, tok):
    client = served.async_client()
    r = await client.chat.completions.create(model="tiny", messages=MSGS)
    choice = r.choices[0]
    assert choice.message.content == "hello world"
    assert choice.finish_reason == "stop"
    ids = tok("hello world", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert choice.model_extra["token_ids"] == ids
    prompt = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert r.model_extra["prompt_token_ids"] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert r.usage.prompt_tokens == len(r.model_extra["prompt_token_ids"])
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + len(ids)


def test_sync_client(served):
    r = served.client().chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    assert len(r.choices[0].model_extra["token_ids"]) == 2


async def test_logprobs_and_top_logprobs(served, tok):
    r = await served.async_client().chat.completions.create(
        model="tiny", messages=MSGS, logprobs=True, top_logprobs=3)
    ids = r.choices[0].model_extra["token_ids"]
    start = r.usage.prompt_tokens
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(
        [fake_logprob(t, start + k) for k, t in enumerate(ids)])
    assert [c.token for c in content] == [tok.decode([t]) for t in ids]
    assert all(len(c.top_logprobs) == 3 for c in content)


async def test_n_samples(served):
    served.engine.script = ["hello world", "bye"]
    r = await served.async_client().chat.completions.create(model="tiny", messages=MSGS, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == ["hello world", "bye"]


async def test_tool_calls_parsed(served):
    served.engine.script = ['I will add.\n<tool_call>{"name": "add", "arguments": '
                            '{"a": 2, "b": 3}}</tool_call>']
    r = await served.async_client().chat.completions.create(
        model="tiny", messages=MSGS, tools=TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content == "I will add."
    assert msg.tool_calls[0].function.name == "add"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"a": 2, "b": 3}


async def test_malformed_tool_call_is_plain_content(served):
    bad = '<tool_call>{"name": "add", "arguments": {oops</tool_call>'
    served.engine.script = [bad]
    r = await served.async_client().chat.completions.create(
        model="tiny", messages=MSGS, tools=TOOLS)
    assert r.choices[0].message.content == bad
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


async def test_stream_async_with_usage(served, tok):
    stream = await served.async_client().chat.completions.create(
        model="tiny", messages=MSGS, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello world"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    assert finish == ["stop"]
    ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra or {}).get(
        "token_ids") or []]
    assert tok.decode(ids[:-1]) == "hello world" and ids[-1] == tok.eos_token_id
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_stream_sync_tool_calls(served):
    served.engine.script = ['<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>']
    stream = served.client().chat.completions.create(
        model="tiny", messages=MSGS, tools=TOOLS, stream=True)
    calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("add", {"a": 1})]


async def test_text_completions_and_models(served, tok):
    client = served.async_client()
    r = await client.completions.create(model="tiny", prompt="abc", max_tokens=5, logprobs=2)
    assert r.choices[0].text == "hello world" + tok.eos_token
    assert r.model_extra["prompt_token_ids"] == tok("abc", add_special_tokens=False)["input_ids"]
    assert len(r.choices[0].logprobs.token_logprobs) == len(r.choices[0].model_extra["token_ids"])
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"n": 99}, "n"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 10_000}, "messages"),  # context length exceeded
])
async def test_bad_params_raise_bad_request(served, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        await served.async_client().chat.completions.create(model="tiny", messages=MSGS,
                                                            **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param


def test_sync_errors(served):
    with pytest.raises(openai.BadRequestError):
        served.client().chat.completions.create(model="tiny", messages=MSGS, n=99)
    with pytest.raises(openai.AuthenticationError):
        served.client("not-a-key").chat.completions.create(model="tiny", messages=MSGS)
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="nope", messages=MSGS)


async def test_bad_key_and_unknown_model(served):
    with pytest.raises(openai.AuthenticationError):
        await served.async_client("wrong").chat.completions.create(model="tiny", messages=MSGS)
    with pytest.raises(openai.NotFoundError) as err:
        await served.async_client().chat.completions.create(model="gpt-9", messages=MSGS)
    assert err.value.body["code"] == "model_not_found"


async def test_invalid_json_is_400(served):
    async with served.http() as http:
        r = await http.post("/v1/chat/completions", content=b"{not json",
                            headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_json"
        r = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = await http.get("/health")
        assert r.json()["policies"]["tiny"]["versions"] == [0]


async def test_stream_n2_and_tool_choice_none(served):
    served.engine.script = ["ab", '<tool_call>{"name": "add", "arguments": {}}</tool_call>']
    stream = await served.async_client().chat.completions.create(
        model="tiny", messages=MSGS, n=2, stream=True, tools=TOOLS, tool_choice="none")
    texts = {0: "", 1: ""}
    finishes = {}
    async for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            assert not ch.delta.tool_calls  # tool_choice "none": no parsing
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts == {0: "ab", 1: '<tool_call>{"name": "add", "arguments": {}}</tool_call>'}
    assert finishes == {0: "stop", 1: "stop"}
