"""Validation of OpenAI request bodies into ``SamplingParams`` (400 errors name the field)."""

from __future__ import annotations

from typing import Any

from .errors import bad_request

_ROLES = {"system", "user", "assistant", "tool", "developer"}


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{name}' must be a number, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise bad_request(f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise bad_request(f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def sampling_fields(body: dict[str, Any], max_n: int) -> dict[str, Any]:
    """The validated sampling fields of a chat or text completion body.

    Returns:
        A dict with ``max_tokens`` (None: fill the context), ``temperature``, ``top_p``,
        ``top_k``, ``seed``, ``n``, ``stop`` (list), ``logprobs`` (bool), ``top_logprobs``.

    Raises:
        GatewayError: 400 naming the offending field.
    """
    max_tokens = _integer(body, "max_completion_tokens", None, 1, 1 << 30)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, 1, 1 << 30)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise bad_request(f"'stop' must be a string or a list of at most 4 strings, got {stop!r}",
                          param="stop")
    logprobs = body.get("logprobs")
    if logprobs is None:
        logprobs = False
    elif isinstance(logprobs, bool):
        pass
    elif isinstance(logprobs, int) and 0 <= logprobs <= 20:  # /v1/completions: an integer
        body = {**body, "top_logprobs": logprobs}
        logprobs = True
    else:
        raise bad_request(f"'logprobs' must be a boolean, got {logprobs!r}", param="logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0, 0, 20) or 0
    if top_logprobs and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 1e-9, 1.0),
        "top_k": _integer(body, "top_k", 0, 0, 1 << 20),
        "seed": _integer(body, "seed", None, -(1 << 63), (1 << 63) - 1),
        "n": _integer(body, "n", 1, 1, max_n),
        "stop": stop,
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
    }


def stream_fields(body: dict[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)`` of a completion body.

    Raises:
        GatewayError: 400 when ``stream`` is not a boolean or ``stream_options`` is not an
            object like ``{"include_usage": true}``.
    """
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"'stream' must be a boolean, got {stream!r}", param="stream")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object such as {\"include_usage\": "
                          f"true}}, got {options!r}", param="stream_options")
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise bad_request(f"'stream_options.include_usage' must be a boolean, got {usage!r}",
                          param="stream_options")
    return bool(stream), bool(usage)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate ``messages``: a non-empty list of ``{"role", "content"?...}`` dicts.

    Raises:
        GatewayError: 400 naming the bad message.
    """
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of message objects",
                          param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise bad_request(f"messages[{i}] needs a 'role' in {sorted(_ROLES)}, got {m!r}",
                              param=f"messages[{i}]")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(f"messages[{i}].content must be a string, got {content!r}",
                              param=f"messages[{i}].content")
        if m["role"] == "developer":  # newer SDKs send it; templates know only "system"
            messages[i] = {**m, "role": "system"}
    return messages


def check_tools(body: dict[str, Any]) -> tuple[list[dict] | None, bool]:
    """``(tools, parse_tool_calls)``: tools as given (None when absent); parsing is off for
    ``tool_choice: "none"``.

    Raises:
        GatewayError: 400 when ``tools`` is not a list of function tools.
    """
    tools = body.get("tools")
    if tools is None or tools == []:
        return None, False
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools):
        raise bad_request("'tools' must be a list of {'type': 'function', 'function': {...}}",
                          param="tools")
    return tools, body.get("tool_choice") != "none"
