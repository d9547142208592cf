"""Tool-call parsers: a model family's tool-call text -> OpenAI ``tool_calls``, one per policy.

A parser maps a completion's text (special tokens kept, trailing stop tokens removed) to
``(content, tool_calls)``. ``tool_calls`` are in OpenAI format: ``{"id", "type": "function",
"function": {"name", "arguments"}}`` with ``arguments`` a JSON string; ``content`` is the text
outside the calls (None when empty). When the text has no call, or any call is malformed (bad
JSON, no name, arguments that are not an object, an unclosed block), the parser returns
``(text, [])``: a bad call is the policy's mistake to learn from, never a server error.

==================== ==================================================================
name                 format
==================== ==================================================================
``hermes``           ``<tool_call>{"name": f, "arguments": {...}}</tool_call>`` blocks
``llama3_json``      ``{"name": f, "parameters": {...}}`` as the whole reply (``; ``
                     between calls), or after ``<|python_tag|>`` with text before it
``mistral``          ``[TOOL_CALLS][{"name": f, "arguments": {...}}, ...]``, or
                     ``[TOOL_CALLS]f[ARGS]{...}`` per call (newer tokenizers)
``gpt_oss``          harmony messages ``<|channel|>commentary to=functions.f ...
                     <|message|>{...}<|call|>``
``response_template`` transformers' ``tokenizer.parse_response`` with the tokenizer's
                     ``response_template`` (a schema naming a ``tool_calls`` field)
``auto``             ``response_template`` when the tokenizer has one with tool calls,
                     else the family whose marker token is in the vocabulary
                     (``<tool_call>``, ``[TOOL_CALLS]``, ``<|python_tag|>``,
                     ``<|channel|>``), else ``hermes``
==================== ==================================================================

Example:
    >>> content, calls = mistral('Sure.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]')
    >>> content, calls[0]["function"], len(calls[0]["id"])
    ('Sure.', {'name': 'add', 'arguments': '{"a": 1}'}, 9)
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

ParsedReply = tuple[str | None, list[dict[str, Any]]]
ToolParser = Callable[[str], ParsedReply]


def _whole_text_on_error(parse: Callable[[str], ParsedReply]) -> ToolParser:
    """A parser that answers ``(text, [])`` when ``parse`` finds no call or raises ValueError
    (``json.JSONDecodeError`` included) on a malformed one."""

    @functools.wraps(parse)
    def parser(text: str) -> ParsedReply:
        try:
            content, calls = parse(text)
        except ValueError:
            return text, []
        if not calls:
            return text, []
        return (content or "").strip() or None, calls

    return parser


def _call(name: Any, arguments: Any, call_id: str | None = None) -> dict[str, Any]:
    """One OpenAI tool call; ValueError for a missing name or non-object arguments."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call needs a non-empty string name, got {name!r}")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments)
    elif not isinstance(arguments, str):
        raise ValueError(f"tool-call arguments must be a JSON object, got {arguments!r}")
    return {"id": call_id or f"call_{uuid.uuid4().hex[:16]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _object(text: str) -> dict[str, Any]:
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return obj


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@_whole_text_on_error
def hermes(text: str) -> ParsedReply:
    """Parse hermes ``<tool_call>{"name", "arguments"}</tool_call>`` blocks (Qwen, Hermes)."""
    calls = []
    for match in _HERMES.finditer(text):
        obj = _object(match.group(1))
        calls.append(_call(obj.get("name"), obj.get("arguments", obj.get("parameters", {}))))
    rest = _HERMES.sub("", text)
    if "<tool_call>" in rest or "</tool_call>" in rest:
        raise ValueError("an unmatched <tool_call> tag")
    return rest, calls


def _json_objects(text: str, separator: str) -> list[dict[str, Any]]:
    """The JSON objects of ``text``, separated by ``separator`` (and whitespace)."""
    decoder, objects, pos = json.JSONDecoder(), [], 0
    while True:
        obj, pos = decoder.raw_decode(text, pos)
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {obj!r}")
        objects.append(obj)
        rest = text[pos:].lstrip()
        if not rest:
            return objects
        if not rest.startswith(separator):
            raise ValueError(f"unexpected text after a call: {rest[:40]!r}")
        pos = len(text) - len(rest[len(separator):].lstrip())


@_whole_text_on_error
def llama3_json(text: str) -> ParsedReply:
    """Parse Llama 3.x JSON tool calls: ``{"name", "parameters"}`` objects (``;``-separated)
    making up the whole reply, or following ``<|python_tag|>`` (text before it is content).
    A trailing ``<|eom_id|>`` / ``<|eot_id|>`` is ignored."""
    body = text.strip()
    for end in ("<|eom_id|>", "<|eot_id|>"):
        body = body.removesuffix(end).rstrip()
    content = ""
    if "<|python_tag|>" in body:
        content, _, body = body.partition("<|python_tag|>")
    elif not body.startswith("{"):
        return text, []
    return content, [_call(obj.get("name"), obj.get("parameters", obj.get("arguments", {})))
                     for obj in _json_objects(body.strip(), ";")]


_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _mistral_id() -> str:
    return uuid.uuid4().hex[:9]  # Mistral chat templates require 9 alphanumeric characters


@_whole_text_on_error
def mistral(text: str) -> ParsedReply:
    """Parse Mistral ``[TOOL_CALLS]`` calls: a JSON list ``[{"name", "arguments"}, ...]``, or
    ``name[ARGS]{...}`` (optionally ``name[CALL_ID]id[ARGS]{...}``) after each marker. Text
    before the first marker is content; a trailing ``</s>`` is ignored. Ids are 9 alphanumeric
    characters (what Mistral templates accept); a valid id the model wrote is kept."""
    content, *parts = text.strip().removesuffix("</s>").split("[TOOL_CALLS]")
    calls = []
    for part in parts:
        part = part.strip()
        if part.startswith("["):
            items = json.loads(part)
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise ValueError(f"expected a list of call objects, got {part!r}")
            calls += [_call(i.get("name"), i.get("arguments", {}), _kept_id(i.get("id")))
                      for i in items]
            continue
        name, found, arguments = part.partition("[ARGS]")
        if not found:
            raise ValueError(f"[TOOL_CALLS] followed by neither a list nor name[ARGS]: {part!r}")
        name, _, call_id = name.partition("[CALL_ID]")
        if not _MISTRAL_NAME.fullmatch(name.strip()):
            raise ValueError(f"bad tool name {name!r}")
        calls.append(_call(name.strip(), _object(arguments), _kept_id(call_id.strip())))
    return content, calls


def _kept_id(call_id: Any) -> str:
    if isinstance(call_id, str) and len(call_id) == 9 and call_id.isalnum():
        return call_id
    return _mistral_id()


_HARMONY_END = re.compile(r"(<\|end\|>|<\|call\|>|<\|return\|>)")
_HARMONY_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")


@_whole_text_on_error
def gpt_oss(text: str) -> ParsedReply:
    """Parse gpt-oss (harmony) calls: messages whose header names ``to=functions.NAME``
    (before or after ``<|channel|>``), JSON arguments after ``<|message|>``, ended by
    ``<|call|>`` or the end of the text (``<|call|>`` may have been removed as a stop token).
    Every other message (analysis, final, preambles) stays in content as generated."""
    pieces = _HARMONY_END.split(text)  # [message, end, message, end, ..., tail]
    content, calls = [], []
    for i in range(0, len(pieces), 2):
        message, end = pieces[i], pieces[i + 1] if i + 1 < len(pieces) else ""
        header, found, body = message.partition("<|message|>")
        recipient = _HARMONY_RECIPIENT.search(header)
        if recipient is None:
            content.append(message + end)
            continue
        if not found or end not in ("<|call|>", ""):
            raise ValueError(f"a function call message not ended by <|call|>: {message!r}")
        calls.append(_call(recipient.group(1), _object(body)))
    return "".join(content), calls


class ResponseTemplateParser:
    """Tool calls found by transformers' response parsing (``tokenizer.parse_response``)
    with the tokenizer's ``response_template``; content is the schema's ``content`` field.

    Parsing starts at the completion (``prefix=""``): a template whose generation prompt
    pre-writes part of the reply (an opening ``<think>``) sees only what the model wrote.

    Raises:
        ConfigError: the tokenizer has no ``response_template`` with a ``tool_calls`` field.
    """

    def __init__(self, tokenizer: Any) -> None:
        if not has_tool_schema(tokenizer):
            raise ConfigError("tool_parser='response_template' needs a tokenizer whose "
                              "response_template has a 'tool_calls' field; pick another "
                              f"tool_parser: {list(TOOL_PARSER_NAMES)}")
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> ParsedReply:
        try:
            parsed = self.tokenizer.parse_response(text, prefix="")
            calls = [_call(fn.get("name"), fn.get("arguments", {})) for fn in
                     (c.get("function", c) for c in parsed.get("tool_calls") or [])]
        except (ValueError, KeyError, TypeError, AttributeError):  # the model's malformed call
            return text, []
        content = parsed.get("content")
        if not calls or not isinstance(content, str | None):
            return text, []
        return (content or "").strip() or None, calls


TOOL_PARSERS: dict[str, ToolParser] = {
    "hermes": hermes, "llama3_json": llama3_json, "mistral": mistral, "gpt_oss": gpt_oss}
TOOL_PARSER_NAMES = ("auto", *TOOL_PARSERS, "response_template")
# marker token in the vocabulary -> family, checked in order
_MARKERS = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
            ("<|python_tag|>", "llama3_json"), ("<|channel|>", "gpt_oss"))


def check_tool_parser(name: Any, where: str = "tool_parser") -> str:
    """``name`` if it names a tool parser.

    Raises:
        ConfigError: unknown name (lists the choices).
    """
    if not isinstance(name, str) or name not in TOOL_PARSER_NAMES:
        raise ConfigError(f"{where}={name!r}: unknown tool-call parser; choose one of "
                          f"{list(TOOL_PARSER_NAMES)}")
    return name


def has_tool_schema(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` has a ``response_template`` with a ``tool_calls`` field."""
    template = getattr(tokenizer, "response_template", None)
    return isinstance(template, dict) and "tool_calls" in (template.get("fields") or {})


def auto_tool_parser(tokenizer: Any) -> str:
    """The parser ``"auto"`` picks for ``tokenizer`` (see the module docstring)."""
    if has_tool_schema(tokenizer):
        return "response_template"
    unk = getattr(tokenizer, "unk_token_id", None)
    for token, family in _MARKERS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != unk:
            return family
    return "hermes"


def tool_parser_for(name: str, tokenizer: Any) -> ToolParser:
    """The parser named ``name`` (``"auto"`` resolved against ``tokenizer``).

    Raises:
        ConfigError: unknown name, or ``"response_template"`` for a tokenizer without one.
    """
    name = check_tool_parser(name)
    if name == "auto":
        name = auto_tool_parser(tokenizer)
    if name == "response_template":
        return ResponseTemplateParser(tokenizer)
    return TOOL_PARSERS[name]
