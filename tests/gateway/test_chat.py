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


class _CountingTokenizer:
    """Wraps a tokenizer and counts its encode calls (hashable by identity)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.inner(text, **kwargs)


def test_encode_memoises_exact_ids_in_fresh_lists(tok):
    from areal_agents.gateway.chat import ENCODE_CACHE_CHARS, encode

    counting = _CountingTokenizer(tok)
    text = "What is 3 + 4? <|im_end|> answer:"
    expected = list(tok(text, add_special_tokens=False)["input_ids"])
    first = encode(counting, text)
    first.append(-1)  # a caller changing its list must not change the cached ids
    second = encode(counting, text)
    assert second == expected and counting.calls == 1
    assert encode(counting, text + " 7") == list(
        tok(text + " 7", add_special_tokens=False)["input_ids"])
    assert counting.calls == 2
    long_text = "x" * (ENCODE_CACHE_CHARS + 1)  # past the bound: tokenised every time
    assert encode(counting, long_text) == encode(counting, long_text)
    assert counting.calls == 4
    other = _CountingTokenizer(tok)  # the cache is per tokenizer
    assert encode(other, text) == expected and other.calls == 1


def test_encode_unhashable_tokenizer_is_not_cached(tok):
    from areal_agents.gateway.chat import encode

    class Unhashable(_CountingTokenizer):
        __hash__ = None

    t = Unhashable(tok)
    assert encode(t, "1 + 1") == encode(t, "1 + 1") == list(
        tok("1 + 1", add_special_tokens=False)["input_ids"])
    assert t.calls == 2


def test_decode_is_memoised_with_the_tokenizer_s_text(tok):
    """``decode`` returns ``tokenizer.decode(ids, skip_special_tokens=False)`` on a miss, a hit
    and past ``DECODE_CACHE_IDS`` (not cached); ``encode_cache_clear`` forgets the texts."""
    from areal_agents.gateway import chat

    chat.encode_cache_clear()
    ids = tok("Answer: 12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    want = tok.decode(ids, skip_special_tokens=False)
    assert chat.decode(tok, ids) == want and chat._decode_cached.cache_info().misses == 1
    assert chat.decode(tok, list(ids)) == want and chat._decode_cached.cache_info().hits == 1
    long = ids * (chat.DECODE_CACHE_IDS // len(ids) + 1)
    assert chat.decode(tok, long) == tok.decode(long, skip_special_tokens=False)
    assert chat._decode_cached.cache_info().currsize == 1  # the long list was not cached
    chat.encode_cache_clear()
    assert chat._decode_cached.cache_info().currsize == 0
