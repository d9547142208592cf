"""Tokenization cases the main suite lacked: a next prompt that matches the previous sample
except at its last token, and a chat template that re-renders earlier turns (it drops the
``<think>`` text of every assistant message but the last, as reasoning-model templates do)."""

from __future__ import annotations

from typing import Any

import pytest

from areal_agents.gateway import Gateway, Turn, turns_to_samples
from areal_agents.gateway.chat import encode, render
from areal_agents.gateway.tokenization import prompt_ids_for
from areal_agents.testing.engine import ScriptedEngine

# ChatML; an assistant message that is not the last one loses its "<think>...</think>" part.
THINK_STRIPPING = (
    "{%- for message in messages -%}"
    "{%- set content = message.content -%}"
    "{%- if message.role == 'assistant' and not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "<|im_start|>{{ message.role }}{{ '\\n' }}{{ content }}<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)
USER1 = {"role": "user", "content": "q1"}
USER2 = {"role": "user", "content": "q2"}


def turn(prompt: list[int], completion: list[int]) -> Turn:
    return Turn(prompt, completion, [-0.5] * len(completion), [0] * len(completion),
                None, None, None, "stop", "r")


def test_prompt_matching_all_but_the_last_token_splits():
    samples, report = turns_to_samples([turn([1, 2], [3]), turn([1, 2, 4, 5], [6])])
    assert [s.token_ids for s in samples] == [[1, 2, 3], [1, 2, 4, 5, 6]]
    assert [(s.turn, s.against, s.position) for s in report.splits] == [(1, 0, 2)]
    assert samples[1].loss_mask == [0, 0, 0, 0, 1]


def test_prompt_matching_every_token_merges():
    samples, report = turns_to_samples([turn([1, 2], [3]), turn([1, 2, 3, 5], [6])])
    assert report.num_splits == 0
    assert samples[0].token_ids == [1, 2, 3, 5, 6]
    assert samples[0].loss_mask == [0, 0, 1, 0, 1]


@pytest.fixture
def think_tok() -> Any:
    """A fresh tiny tokenizer with the think-stripping template (the shared ``tok`` is untouched)."""
    from areal_agents.models import tiny_tokenizer

    think = tiny_tokenizer()
    think.chat_template = THINK_STRIPPING
    return think


def recorded_turn(tokenizer: Any, reply_text: str) -> Turn:
    """Turn 0: ``[USER1]`` answered with ``reply_text`` (its EOS generated)."""
    eos = tokenizer.eos_token_id
    prompt = encode(tokenizer, render(tokenizer, [USER1], None, add_generation_prompt=True))
    completion = [*encode(tokenizer, reply_text), eos]
    return Turn(prompt, completion, [-0.5] * len(completion), [0] * len(completion), [USER1],
                {"role": "assistant", "content": reply_text}, None, "stop", "r0")


def test_rerendered_earlier_turn_is_tokenized_from_scratch(think_tok):
    t0 = recorded_turn(think_tok, "<think>hmm</think>yes")
    messages = [USER1, t0.reply, USER2]
    full = render(think_tok, messages, None, add_generation_prompt=True)
    assert "hmm" not in full  # the template dropped the earlier reasoning
    ids, prefix = prompt_ids_for(think_tok, [t0], messages, None, think_tok.eos_token_id)
    assert prefix is None
    assert ids == encode(think_tok, full)
    assert "hmm" not in think_tok.decode(ids)


def test_template_that_keeps_earlier_text_still_merges(think_tok):
    t0 = recorded_turn(think_tok, "yes")  # nothing to strip: the rendering is a prefix
    messages = [USER1, t0.reply, USER2]
    ids, prefix = prompt_ids_for(think_tok, [t0], messages, None, think_tok.eos_token_id)
    assert prefix == 0
    assert ids[: len(t0.prompt_ids) + len(t0.completion_ids)] == t0.prompt_ids + t0.completion_ids
    assert think_tok.decode(ids) == render(think_tok, messages, None, add_generation_prompt=True)


async def test_gateway_session_with_think_stripping_template_reports_the_split(think_tok):
    gw = Gateway()
    gw.add_policy("p", [ScriptedEngine(["<think>hmm</think>yes", "no"], tokenizer=think_tok)],
                  think_tok)
    key = await gw.create_session("p")
    client = gw.async_client(key)
    try:
        r = await client.chat.completions.create(model="p", messages=[USER1])
        reply = r.choices[0].message.model_dump(exclude_none=True, exclude={"refusal"})
        assert reply["content"] == "<think>hmm</think>yes"
        await client.chat.completions.create(model="p", messages=[USER1, reply, USER2])
        t0, t1 = gw.session(key).turns
        assert t1.prefix_turn is None
        assert "hmm" not in think_tok.decode(t1.prompt_ids)
        samples, report = gw.session(key).to_samples()
        assert report.num_samples == 2 and report.num_splits == 1
        assert samples[1].token_ids == t1.prompt_ids + t1.completion_ids
        # the split is where the re-rendered reply starts to differ (after "...assistant\n")
        prefix = think_tok.decode(t0.prompt_ids)
        assert think_tok.decode(samples[0].token_ids[: report.splits[0].position]) == prefix
    finally:
        await client.close()
        await gw.close()
