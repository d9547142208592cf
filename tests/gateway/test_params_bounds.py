"""Sampling-field bounds at and just past each edge: accepted values pass through, rejected
ones raise a 400 naming the field and the allowed range."""

from __future__ import annotations

import pytest

from areal_agents.gateway.errors import GatewayError
from areal_agents.gateway.params import sampling_fields


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 0), ("temperature", 2), ("temperature", 2.0), ("top_p", 1.0),
    ("top_p", 1e-9), ("top_k", 0), ("max_tokens", 1), ("n", 4), ("top_logprobs", 20),
])
def test_values_on_the_edge_are_accepted(field, value):
    body = {field: value, "logprobs": True} if field == "top_logprobs" else {field: value}
    assert sampling_fields(body, max_n=4)[field] == value


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", 2.5, "'temperature' must be in [0.0, 2.0], got 2.5"),
    ("temperature", -0.5, "'temperature' must be in [0.0, 2.0], got -0.5"),
    ("top_p", 1.5, "'top_p' must be in [1e-09, 1.0], got 1.5"),
    ("top_p", 0, "'top_p' must be in [1e-09, 1.0], got 0"),
    ("top_k", -1, "'top_k' must be in [0, 1048576], got -1"),
    ("max_tokens", 0, "'max_tokens' must be in [1, 1073741824], got 0"),
    ("max_completion_tokens", 0, "'max_completion_tokens' must be in [1, 1073741824], got 0"),
    ("n", 5, "'n' must be in [1, 4], got 5"),
    ("n", 0, "'n' must be in [1, 4], got 0"),
    ("seed", 1 << 63, f"'seed' must be in [{-(1 << 63)}, {(1 << 63) - 1}], got {1 << 63}"),
])
def test_values_past_the_edge_are_rejected(field, value, message):
    with pytest.raises(GatewayError) as info:
        sampling_fields({field: value}, max_n=4)
    assert (info.value.status, info.value.param, info.value.message) == (400, field, message)


def test_top_logprobs_past_twenty_is_rejected():
    with pytest.raises(GatewayError) as info:
        sampling_fields({"logprobs": True, "top_logprobs": 21}, max_n=1)
    assert info.value.message == "'top_logprobs' must be in [0, 20], got 21"
    with pytest.raises(GatewayError, match="'logprobs' must be a boolean, got 21"):
        sampling_fields({"logprobs": 21}, max_n=1)  # the /v1/completions integer form
    assert sampling_fields({"logprobs": 20}, max_n=1)["top_logprobs"] == 20


def test_defaults_when_fields_are_absent():
    assert sampling_fields({}, max_n=1) == {
        "max_tokens": None, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None,
        "n": 1, "stop": [], "logprobs": False, "top_logprobs": 0}
