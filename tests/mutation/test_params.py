"""Request-body validation details that the mutation run found untested: type checks, the
``stop`` and ``logprobs`` forms, message and tool checks, with their exact 400 messages."""

from __future__ import annotations

import pytest

from areal_agents.gateway.errors import GatewayError
from areal_agents.gateway.params import check_messages, check_tools, sampling_fields


def rejected(call, *args) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        call(*args)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", "hot", "'temperature' must be a number, got 'hot'"),
    ("temperature", True, "'temperature' must be a number, got True"),
    ("top_p", None, None),
    ("top_k", 1.5, "'top_k' must be an integer, got 1.5"),
    ("n", True, "'n' must be an integer, got True"),
    ("max_tokens", "8", "'max_tokens' must be an integer, got '8'"),
])
def test_types_are_checked(field, value, message):
    if message is None:
        assert sampling_fields({field: value}, max_n=1)[field] == 1.0  # null means default
        return
    error = rejected(sampling_fields, {field: value}, 1)
    assert (error.param, error.message) == (field, message)


def test_numbers_come_back_as_floats_and_ints():
    fields = sampling_fields({"temperature": 1, "top_p": 1, "top_k": 3, "seed": -5,
                              "max_tokens": 7}, max_n=1)
    assert type(fields["temperature"]) is float and type(fields["top_p"]) is float
    assert (fields["top_k"], fields["seed"], fields["max_tokens"]) == (3, -5, 7)


def test_max_completion_tokens_wins_over_max_tokens():
    assert sampling_fields({"max_completion_tokens": 5, "max_tokens": 9}, 1)["max_tokens"] == 5
    assert sampling_fields({"max_tokens": 9}, 1)["max_tokens"] == 9


@pytest.mark.parametrize(("stop", "expected"), [
    (None, []), ("END", ["END"]), (["a", "b", "c", "d"], ["a", "b", "c", "d"]), ([], []),
])
def test_stop_forms(stop, expected):
    assert sampling_fields({"stop": stop}, max_n=1)["stop"] == expected


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [1], {"x": 1}, 3])
def test_bad_stop_is_rejected(stop):
    error = rejected(sampling_fields, {"stop": stop}, 1)
    assert error.param == "stop"
    assert error.message == (f"'stop' must be a string or a list of at most 4 strings, "
                             f"got {stop!r}")


@pytest.mark.parametrize(("logprobs", "expected"), [
    (None, (False, 0)), (False, (False, 0)), (True, (True, 0)), (0, (True, 0)), (3, (True, 3)),
    (20, (True, 20)),
])
def test_logprobs_forms(logprobs, expected):
    fields = sampling_fields({"logprobs": logprobs}, max_n=1)
    assert (fields["logprobs"], fields["top_logprobs"]) == expected


@pytest.mark.parametrize("logprobs", [-1, 21, "yes", 1.0])
def test_bad_logprobs_is_rejected(logprobs):
    error = rejected(sampling_fields, {"logprobs": logprobs}, 1)
    assert (error.param, error.message) == (
        "logprobs", f"'logprobs' must be a boolean, got {logprobs!r}")


def test_top_logprobs_needs_logprobs():
    error = rejected(sampling_fields, {"top_logprobs": 2}, 1)
    assert (error.param, error.message) == ("top_logprobs",
                                            "'top_logprobs' needs 'logprobs': true")
    assert sampling_fields({"top_logprobs": 0}, 1)["top_logprobs"] == 0
    assert sampling_fields({"logprobs": True, "top_logprobs": None}, 1)["top_logprobs"] == 0


def test_messages_are_checked_and_developer_becomes_system():
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": None}]
    out = check_messages(messages)
    assert out is messages
    assert out[0] == {"role": "system", "content": "be brief"}
    assert [m["role"] for m in out] == ["system", "user", "assistant"]


@pytest.mark.parametrize(("messages", "param", "message"), [
    ([], "messages", "'messages' must be a non-empty list of message objects"),
    ("hi", "messages", "'messages' must be a non-empty list of message objects"),
    ([{"role": "robot", "content": "x"}], "messages[0]",
     "messages[0] needs a 'role' in ['assistant', 'developer', 'system', 'tool', 'user'], "
     "got {'role': 'robot', 'content': 'x'}"),
    ([{"role": "user", "content": "a"}, "b"], "messages[1]",
     "messages[1] needs a 'role' in ['assistant', 'developer', 'system', 'tool', 'user'], "
     "got 'b'"),
    ([{"role": "user", "content": 5}], "messages[0].content",
     "messages[0].content must be a string, got 5"),
])
def test_bad_messages_are_rejected(messages, param, message):
    error = rejected(check_messages, messages)
    assert (error.param, error.message) == (param, message)


def test_tools():
    tools = [{"type": "function", "function": {"name": "add"}}]
    assert check_tools({}) == (None, False)
    assert check_tools({"tools": []}) == (None, False)
    assert check_tools({"tools": tools}) == (tools, True)
    assert check_tools({"tools": tools, "tool_choice": "auto"}) == (tools, True)
    assert check_tools({"tools": tools, "tool_choice": "none"}) == (tools, False)
    for bad in ({"name": "add"}, [{"type": "function"}], [{"function": "add"}], ["add"]):
        error = rejected(check_tools, {"tools": bad})
        assert (error.param, error.message) == (
            "tools", "'tools' must be a list of {'type': 'function', 'function': {...}}")
