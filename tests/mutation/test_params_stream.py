"""``stream_fields``: the ``stream`` / ``stream_options`` forms and their exact 400 messages
(untested by the params group's files in the mutation run)."""

from __future__ import annotations

import pytest

from areal_agents.gateway.errors import GatewayError
from areal_agents.gateway.params import stream_fields


@pytest.mark.parametrize(("body", "expected"), [
    ({}, (False, False)),
    ({"stream": False}, (False, False)),
    ({"stream": True}, (True, False)),
    ({"stream": True, "stream_options": {}}, (True, False)),
    ({"stream": True, "stream_options": {"include_usage": True}}, (True, True)),
    ({"stream": True, "stream_options": {"include_usage": False}}, (True, False)),
    ({"stream_options": {"include_usage": True}}, (False, True)),
    ({"stream": None, "stream_options": None}, (False, False)),
])
def test_stream_fields(body, expected):
    assert stream_fields(body) == expected


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"stream": "yes"}, "stream", "'stream' must be a boolean, got 'yes'"),
    ({"stream": 1}, "stream", "'stream' must be a boolean, got 1"),
    ({"stream": True, "stream_options": True}, "stream_options",
     "'stream_options' must be an object such as {\"include_usage\": true}, got True"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options",
     "'stream_options.include_usage' must be a boolean, got 'yes'"),
])
def test_stream_fields_errors(body, param, message):
    with pytest.raises(GatewayError) as info:
        stream_fields(body)
    assert (info.value.status, info.value.param, info.value.message) == (400, param, message)
