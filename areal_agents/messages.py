"""OpenAI-format chat messages and tool calls, and parsing of agent actions."""

from __future__ import annotations

import json
from typing import Any, Literal, NotRequired, TypedDict

Role = Literal["system", "user", "assistant", "tool"]


class FunctionCall(TypedDict):
    """The function part of a tool call: ``arguments`` is a JSON-encoded string (OpenAI format)."""

    name: str
    arguments: str


class ToolCall(TypedDict):
    """One tool call of an assistant message, OpenAI format."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(TypedDict):
    """One chat message, OpenAI format."""

    role: Role
    content: str | None
    tool_calls: NotRequired[list[ToolCall]]
    tool_call_id: NotRequired[str]
    name: NotRequired[str]


ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


def message(role: Role, content: str | None, **extra: Any) -> Message:
    """Build a message dict; ``extra`` may hold ``tool_calls``, ``tool_call_id`` or ``name``."""
    msg: dict[str, Any] = {"role": role, "content": content}
    msg.update(extra)
    return msg  # type: ignore[return-value]


def user(content: str) -> Message:
    """A user message."""
    return message("user", content)


def system(content: str) -> Message:
    """A system message."""
    return message("system", content)


def tool_result(tool_call_id: str, content: str, name: str | None = None) -> Message:
    """A tool-result message answering the tool call ``tool_call_id``."""
    extra: dict[str, Any] = {"tool_call_id": tool_call_id}
    if name is not None:
        extra["name"] = name
    return message("tool", content, **extra)


def tool_call(name: str, arguments: dict[str, Any] | str, call_id: str = "call_0") -> ToolCall:
    """Build a tool call; ``arguments`` may be a dict (JSON-encoded here) or a JSON string."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def parse_action(action: Any) -> Message:
    """Normalise an agent action into an assistant message.

    Args:
        action: a ``str`` (taken as the assistant's content) or an assistant message dict with
            ``content`` and/or ``tool_calls``. The OpenAI SDK's message objects (pydantic models
            with ``model_dump``) are accepted too.

    Returns:
        A new assistant ``Message`` dict (``content`` is a str or None; ``tool_calls`` kept).

    Raises:
        TypeError: the action is neither a str nor a mapping.
        ValueError: the dict's role is not "assistant", or it has neither content nor tool calls,
            or a tool call is malformed.
    """
    if isinstance(action, str):
        return {"role": "assistant", "content": action}
    if hasattr(action, "model_dump") and not isinstance(action, dict):
        action = action.model_dump(exclude_none=True)
    if not isinstance(action, dict):
        raise TypeError(
            f"an action must be a str or an assistant message dict, got {type(action).__name__}; "
            "pass the assistant's text or {'role': 'assistant', 'content': ...}"
        )
    role = action.get("role", "assistant")
    if role != "assistant":
        raise ValueError(f"an action must be an assistant message, got role {role!r}")
    content = action.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"an action's content must be a str or None, got {type(content).__name__}")
    calls = action.get("tool_calls") or []
    if content is None and not calls:
        raise ValueError("an action needs 'content' or 'tool_calls'; both are missing")
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        out["tool_calls"] = [_check_tool_call(c) for c in calls]
    return out  # type: ignore[return-value]


def _check_tool_call(call: Any) -> ToolCall:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ValueError(f"a tool call must be {{'id', 'type', 'function': {{...}}}}, got {call!r}")
    fn = call["function"]
    if not isinstance(fn.get("name"), str):
        raise ValueError(f"a tool call's function needs a str 'name', got {fn!r}")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args)
    return {
        "id": str(call.get("id", "call_0")),
        "type": "function",
        "function": {"name": fn["name"], "arguments": args},
    }
