"""Hermes tool-call parsing and completion decoding."""

from __future__ import annotations

import json

from areal_agents.gateway.chat import decode_completion, parse_tool_calls, same_message


def test_parse_two_calls_and_content():
    text = ('thinking\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "thinking"
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": 1}, {"y": 2}]
    assert len({c["id"] for c in calls}) == 2


def test_malformed_calls_are_content():
    for bad in ['<tool_call>{"name": 1}</tool_call>', '<tool_call>[1]</tool_call>',
                '<tool_call>{"name": "a"', 'x <tool_call>{bad}</tool_call>',
                '<tool_call>{"name": "a"}</tool_call></tool_call>']:
        assert parse_tool_calls(bad) == (bad, [])
    assert parse_tool_calls("plain") == ("plain", [])


def test_decode_completion_trims_stop(tok):
    ids = tok("abc STOP def", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert decode_completion(tok, ids, [], {tok.eos_token_id}) == "abc STOP def"
    assert decode_completion(tok, ids, [" STOP"], {tok.eos_token_id}) == "abc"


def test_same_message_ignores_ids_and_spacing():
    a = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]}
    b = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "2", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    assert same_message(a, b)
    assert not same_message(a, {**b, "content": "x"})
    assert not same_message({"role": "user", "content": None}, b)
