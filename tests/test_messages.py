"""Action parsing and message helpers."""

import json

import pytest

import areal_agents as aa


def test_str_action_becomes_assistant_message():
    assert aa.parse_action("hi") == {"role": "assistant", "content": "hi"}


def test_dict_action_keeps_tool_calls_and_encodes_dict_arguments():
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    msg = aa.parse_action({"role": "assistant", "content": None, "tool_calls": [call]})
    assert msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "add", "arguments": json.dumps({"a": 1})}
    assert msg["tool_calls"][0]["id"] == "c1"


def test_sdk_style_object_with_model_dump_is_accepted():
    class Fake:
        def model_dump(self, exclude_none=False):
            return {"role": "assistant", "content": "ok"}

    assert aa.parse_action(Fake()) == {"role": "assistant", "content": "ok"}


@pytest.mark.parametrize(
    ("action", "error", "text"),
    [
        (3, TypeError, "must be a str or an assistant message dict, got int"),
        ({"role": "user", "content": "x"}, ValueError, "got role 'user'"),
        ({"role": "assistant"}, ValueError, "needs 'content' or 'tool_calls'"),
        ({"content": 5}, ValueError, "content must be a str or None, got int"),
        ({"content": None, "tool_calls": [{"x": 1}]}, ValueError, "a tool call must be"),
    ],
)
def test_bad_actions_raise_clear_errors(action, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        aa.parse_action(action)


def test_helpers_build_openai_messages():
    assert aa.user("x") == {"role": "user", "content": "x"}
    assert aa.system("s") == {"role": "system", "content": "s"}
    assert aa.tool_result("c1", "3", name="add") == {
        "role": "tool", "content": "3", "tool_call_id": "c1", "name": "add"
    }
    assert aa.tool_call("add", {"a": 1}, "c2") == {
        "id": "c2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}
    }
