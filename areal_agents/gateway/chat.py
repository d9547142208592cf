"""Chat templating with a policy's tokenizer (tool-call parsing: ``tool_parsing.py``).

Completions are decoded to text here only to *answer* the client; training data always uses
the engine's token ids (see ``tokenization.py``).
"""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from typing import Any

from .tool_parsing import hermes


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages in the shape HF chat templates expect.

    Tool-call ``arguments`` arrive as JSON strings (OpenAI format); templates conventionally
    render a dict with ``tojson``, so valid JSON strings are decoded to objects.
    """
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        elif isinstance(m["content"], list):  # content parts: keep the text parts
            m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function", {}))
                args = fn.get("arguments")
                if isinstance(args, str):
                    with contextlib.suppress(json.JSONDecodeError):
                        fn["arguments"] = json.loads(args)
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


def render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict] | None,
           add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages`` (and ``tools``).

    Raises:
        ValueError: the tokenizer has no chat template or the template rejected the messages.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the policy's tokenizer has no chat_template; use /v1/completions "
                         "or a tokenizer with a chat template")
    try:
        return tokenizer.apply_chat_template(
            template_messages(messages), tools=tools or None, tokenize=False,
            add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises TemplateError and friends
        raise ValueError(f"the chat template could not render these messages: {exc}") from exc


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no BOS/EOS added (special-token text maps to its id).

    A fresh list each call (callers may change it). The ids of recent texts of at most
    ``ENCODE_CACHE_CHARS`` characters are memoised per tokenizer (a group of episodes sends
    the same prompt text, a session resends its history): the tokenizer is deterministic, so
    a hit returns exactly the ids it would compute. A tokenizer changed in place (tokens
    added) after serving needs ``encode_cache_clear()``.
    """
    if len(text) > ENCODE_CACHE_CHARS or getattr(tokenizer, "__hash__", None) is None:
        return _encode(tokenizer, text)
    return list(_encode_cached(tokenizer, text))


ENCODE_CACHE_CHARS = 16_384  # longer texts are tokenised each time (bounds the cache's memory)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=1024)
def _encode_cached(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(_encode(tokenizer, text))


def encode_cache_clear() -> None:
    """Forget every memoised encoding and decoding (after changing a tokenizer's vocabulary
    in place)."""
    _encode_cached.cache_clear()
    _decode_cached.cache_clear()


DECODE_CACHE_IDS = 256  # longer id lists are decoded each time


def decode(tokenizer: Any, ids: list[int]) -> str:
    """``tokenizer.decode(ids, skip_special_tokens=False)``, memoised for recent id lists of at
    most ``DECODE_CACHE_IDS`` ids per tokenizer (short completions repeat: an RL batch's
    answers are often the same tokens). Deterministic, so a hit is the text it would decode;
    ``encode_cache_clear()`` forgets them too."""
    if len(ids) > DECODE_CACHE_IDS or getattr(tokenizer, "__hash__", None) is None:
        return tokenizer.decode(ids, skip_special_tokens=False)
    return _decode_cached(tokenizer, tuple(ids))


@lru_cache(maxsize=4096)
def _decode_cached(tokenizer: Any, ids: tuple[int, ...]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def decode_completion(tokenizer: Any, token_ids: list[int], stop: list[str],
                      stop_token_ids: set[int]) -> str:
    """The text a client sees: stop tokens at the end removed, cut at the first stop string."""
    ids = list(token_ids)
    while ids and ids[-1] in stop_token_ids:
        ids.pop()
    text = decode(tokenizer, ids)
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split hermes ``<tool_call>{"name", "arguments"}</tool_call>`` blocks out of ``text``
    (``tool_parsing.hermes``; other families and the per-policy choice are in
    ``tool_parsing``).

    Returns:
        ``(content, tool_calls)`` in OpenAI format (``arguments`` a JSON string). Content is
        the text outside the blocks (None when empty). When any block is malformed (bad JSON,
        no name, an unclosed ``<tool_call>``) the whole text is returned as content with no
        tool calls: a bad call is the policy's mistake to learn from, never a server error.
    """
    return hermes(text)


def same_message(sent: dict[str, Any], reply: dict[str, Any]) -> bool:
    """Whether a client's echoed assistant message equals the reply the gateway returned.

    Tool calls compare by name and decoded arguments (ids and JSON spacing may change).
    """
    if sent.get("role") != "assistant":
        return False
    if (sent.get("content") or None) != (reply.get("content") or None):
        return False
    a, b = sent.get("tool_calls") or [], reply.get("tool_calls") or []
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        fx, fy = x.get("function", {}), y.get("function", {})
        if fx.get("name") != fy.get("name") or _args(fx.get("arguments")) != _args(
                fy.get("arguments")):
            return False
    return True


def _args(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
