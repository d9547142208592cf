"""Tokenization-contract details the mutation run found untested: the conversation key, the
index, the search over earlier turns (each check must skip a turn, not end the search),
sample defaults, sampling-parameter splits and the split reasons."""

from __future__ import annotations

from typing import Any

import pytest

from areal_agents.gateway import Turn, turns_to_samples
from areal_agents.gateway.chat import encode, render
from areal_agents.gateway.tokenization import conversation_key, index_turn, prompt_ids_for
from areal_agents.samples import SamplingDistribution

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
# ChatML that ignores tools and drops the <think> text of all but the last message.
PLAIN = (
    "{%- for message in messages -%}"
    "{%- set content = message.content or '' -%}"
    "{%- if message.role == 'assistant' and not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "<|im_start|>{{ message.role }}{{ '\\n' }}{{ content }}<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant", "content": text}
    if calls is not None:
        out["tool_calls"] = calls
    return out


def call(name: str, arguments: Any, call_id: str = "c1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture(scope="module")
def tok() -> Any:
    from areal_agents.models import tiny_tokenizer

    out = tiny_tokenizer()
    out.chat_template = PLAIN
    return out


def record(tok: Any, messages: list[dict[str, Any]], reply: str,
           tools: list[dict] | None = None) -> Turn:
    """A turn as the gateway records it: the rendered prompt, the reply's ids + EOS."""
    prompt = encode(tok, render(tok, messages, tools, add_generation_prompt=True))
    completion = [*encode(tok, reply), tok.eos_token_id]
    return Turn(prompt, completion, [-0.5] * len(completion), [0] * len(completion),
                messages, assistant(reply), tools, "stop", "r")


# ---- conversation_key -------------------------------------------------------------------

def test_key_ignores_call_ids_json_spacing_dict_order_and_empty_content():
    a = [user("q"), assistant("", [call("add", '{"a": 1, "b": 2}', "c1")])]
    b = [{"content": "q", "role": "user"},
         {"role": "assistant", "content": None,
          "tool_calls": [call("add", '{"b":2,"a":1}', "other-id")]}]
    c = [user("q"), assistant(None, [call("add", {"a": 1, "b": 2}, "c9")])]
    assert conversation_key(a) == conversation_key(b) == conversation_key(c)


@pytest.mark.parametrize("other", [
    [user("q"), assistant("", [call("sub", '{"a": 1, "b": 2}')])],  # name
    [user("q"), assistant("", [call("add", '{"a": 1, "b": 3}')])],  # arguments
    [user("q"), assistant("")],  # no call
    [user("q"), assistant("text", [call("add", '{"a": 1, "b": 2}')])],  # content
    [user("Q"), assistant("", [call("add", '{"a": 1, "b": 2}')])],  # a user message
])
def test_key_tells_conversations_apart(other):
    base = [user("q"), assistant("", [call("add", '{"a": 1, "b": 2}')])]
    assert conversation_key(other) != conversation_key(base)


def test_key_of_malformed_calls_and_unusual_values():
    assert conversation_key([assistant("", [{"id": "x"}])]) == conversation_key(
        [assistant("", [{"id": "y", "function": {}}])])
    assert conversation_key([assistant("", [call("f", "not json")])]) != conversation_key(
        [assistant("", [call("f", "other")])])

    class Part:
        def __str__(self) -> str:
            return "part"

    assert "part" in conversation_key([{"role": "user", "content": [Part()]}])


def test_assistant_contents_differ():
    assert conversation_key([assistant("a")]) != conversation_key([assistant("b")])
    assert conversation_key([assistant("")]) == conversation_key([assistant(None)])


# ---- index_turn ---------------------------------------------------------------------------

def test_index_registers_only_chat_turns_with_a_reply():
    index: dict[str, list[int]] = {}
    chat = Turn([1], [2], [0.0], [0], [user("q")], assistant("a"), None, "stop", "r")
    no_reply = Turn([1], [2], [0.0], [0], [user("q")], None, None, "stop", "r")
    completion = Turn([1], [2], [0.0], [0], None, None, None, "stop", "r")
    turns = [no_reply, completion, chat, chat]
    for i in range(len(turns)):
        index_turn(index, turns, i)
    assert index == {conversation_key([user("q"), assistant("a")]): [2, 3]}


# ---- prompt_ids_for -----------------------------------------------------------------------

def ids_and_prefix(tok: Any, turns: list[Turn], messages: list[dict[str, Any]],
                   tools: list[dict] | None = None, use_index: bool = False):
    index: dict[str, list[int]] | None = None
    if use_index:
        index = {}
        for i in range(len(turns)):
            index_turn(index, turns, i)
    return prompt_ids_for(tok, turns, messages, tools, tok.eos_token_id, index)


def extends(tok: Any, ids: list[int], turn: Turn, messages: list[dict[str, Any]]) -> bool:
    """``ids`` start with ``turn``'s prompt + completion and decode to the full rendering."""
    head = turn.prompt_ids + turn.completion_ids
    full = render(tok, messages, None, add_generation_prompt=True)
    return ids[: len(head)] == head and tok.decode(ids) == full


@pytest.mark.parametrize("use_index", [False, True])
def test_request_ending_with_the_reply_extends_it(tok, use_index):
    t0 = record(tok, [user("q")], "a")
    messages = [user("q"), assistant("a")]
    ids, prefix = ids_and_prefix(tok, [t0], messages, use_index=use_index)
    assert prefix == 0
    assert extends(tok, ids, t0, messages)


def test_index_prefers_the_turn_with_the_longest_history(tok):
    """Turn 2 re-asked turn 0's question and got the same reply; the request continues turn
    1's longer conversation, so the prompt must keep turn 1's generated ids (the reply "b"
    would otherwise be re-tokenized from text)."""
    t0 = record(tok, [user("q")], "a")
    t1 = record(tok, [user("q"), assistant("a"), user("more")], "b")
    t2 = record(tok, [user("q")], "a")
    messages = [user("q"), assistant("a"), user("more"), assistant("b"), user("again")]
    ids, prefix = ids_and_prefix(tok, [t0, t1, t2], messages, use_index=True)
    assert prefix == 1
    assert extends(tok, ids, t1, messages)


def test_reasking_the_same_messages_starts_afresh(tok):
    t0 = record(tok, [user("q")], "a")
    ids, prefix = ids_and_prefix(tok, [t0], [user("q")])
    assert (ids, prefix) == (t0.prompt_ids, None)


@pytest.mark.parametrize("case", ["tools", "messages", "reply", "rendering", "no reply"])
def test_a_later_turn_that_does_not_fit_is_skipped_not_final(tok, case):
    """The scan (no index) looks at the latest turn first; when it fails one check the
    earlier turn 0, which fits, must still be found."""
    t0 = record(tok, [user("q")], "a")
    messages = [user("q"), assistant("a"), user("more")]
    if case == "tools":  # same messages and reply, other tools (the template ignores them)
        later = record(tok, [user("q")], "a", tools=TOOLS)
    elif case == "messages":
        later = record(tok, [user("other")], "a")
    elif case == "reply":
        later = record(tok, [user("q")], "b")
    elif case == "no reply":
        later = record(tok, [user("q")], "a")
        later.reply = None
    else:  # its rendering keeps <think> text that the request's rendering drops
        later = record(tok, [user("q"), assistant("a"), user("more")], "<think>x</think>b")
        messages = [*messages, later.reply, user("again")]
    ids, prefix = ids_and_prefix(tok, [t0, later], messages)
    assert prefix == 0
    assert extends(tok, ids, t0, messages)


# ---- turns_to_samples ---------------------------------------------------------------------

def turn(prompt: list[int], completion: list[int], temperature: float = 1.0) -> Turn:
    return Turn(prompt, completion, [-0.5] * len(completion), [0] * len(completion), None,
                None, None, "stop", "r", sampling=SamplingDistribution(temperature=temperature))


def test_sample_defaults_and_report_counts():
    samples, report = turns_to_samples([turn([1], [2])])
    (s,) = samples
    assert (s.reward, s.agent, s.policy, s.group) == (0.0, "", "", "")
    assert s.meta == {"turns": [0]}
    assert (report.num_turns, report.num_samples, report.num_splits) == (1, 1, 0)


def test_a_turn_can_extend_an_older_sample():
    samples, _ = turns_to_samples([turn([1, 2], [3]), turn([1, 9], [7]), turn([1, 2, 3, 4], [5])])
    assert [s.meta["turns"] for s in samples] == [[0, 2], [1]]
    turns = [turn([1, 2], [3]), turn([1, 9], [7]), turn([1, 5], [8]), turn([1, 2, 3, 4], [5])]
    samples, report = turns_to_samples(turns)
    assert [s.meta["turns"] for s in samples] == [[0, 3], [1], [2]]
    assert samples[0].token_ids == [1, 2, 3, 4, 5]
    assert report.num_splits == 2


def test_a_prompt_equal_to_the_sample_merges():
    samples, report = turns_to_samples([turn([1, 2], [3]), turn([1, 2, 3], [4])])
    assert report.num_splits == 0
    assert samples[0].token_ids == [1, 2, 3, 4]
    assert samples[0].loss_mask == [0, 0, 1, 1]


def test_other_sampling_params_split_against_the_extended_sample():
    turns = [turn([1, 2], [3]), turn([1, 2, 3, 4], [5], temperature=0.5)]
    samples, report = turns_to_samples(turns)
    assert [s.token_ids for s in samples] == [[1, 2, 3], [1, 2, 3, 4, 5]]
    assert [s.sampling.temperature for s in samples] == [1.0, 0.5]
    (split,) = report.splits
    assert (split.turn, split.against, split.position) == (1, 0, 3)
    assert split.reason == (
        "sampling params differ from the sequence it extends "
        "(SamplingDistribution(temperature=0.5, top_k=0, top_p=1.0) vs "
        "SamplingDistribution(temperature=1.0, top_k=0, top_p=1.0))")


def test_split_reasons():
    shorter = turns_to_samples([turn([1, 2], [3]), turn([1], [4])])[1].splits
    differs = turns_to_samples([turn([1, 2], [3]), turn([1, 5, 6], [4])])[1].splits
    assert [(s.turn, s.against, s.position, s.reason) for s in shorter + differs] == [
        (1, 0, 1, "prompt is shorter than the previous sequence"),
        (1, 0, 1, "prompt differs from the previous sequence (history edited, new system "
                  "prompt, or a branch)")]
