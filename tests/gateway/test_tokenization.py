"""The tokenization contract: merged multi-turn samples, masks, splits with positions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from areal_agents.gateway import Gateway, Turn, turns_to_samples
from areal_agents.gateway.tokenization import prompt_ids_for
from areal_agents.testing.engine import ScriptedEngine

SYS = {"role": "system", "content": "be brief"}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {}}}]


@pytest.fixture
async def session(tok):
    gw = Gateway()
    engine = ScriptedEngine(["one"], tokenizer=tok)
    gw.add_policy("p", [engine], tok)
    key = await gw.create_session("p")
    return gw, engine, gw.async_client(key), gw.session(key)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


async def chat(client, msgs, **kw):
    r = await client.chat.completions.create(model="p", messages=msgs, **kw)
    return r, r.choices[0].message.model_dump(exclude_none=True, exclude={"refusal"})


async def test_multi_turn_merges_into_one_sample(session, tok):
    _gw, engine, client, sess = session
    engine.script = ["one", "two words here", "three"]
    msgs = [SYS, {"role": "user", "content": "u1"}]
    _r1, a1 = await chat(client, msgs)
    msgs += [a1, {"role": "user", "content": "u2"}]
    r2, a2 = await chat(client, msgs, max_tokens=2)  # truncated: no <|im_end|> generated
    assert r2.choices[0].finish_reason == "length"
    msgs += [a2, {"role": "user", "content": "u3"}]
    _r3, _ = await chat(client, msgs)
    t1, t2, t3 = sess.turns
    assert t2.prefix_turn == 0 and t3.prefix_turn == 1
    assert t2.prompt_ids[: len(t1.prompt_ids) + len(t1.completion_ids)] == (
        t1.prompt_ids + t1.completion_ids)
    # the template's "\n" after the generated <|im_end|> is prompt text, not generated
    rest = t2.prompt_ids[len(t1.prompt_ids) + len(t1.completion_ids):]
    assert tok.decode(rest) == "\n<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n"
    rest = t3.prompt_ids[len(t2.prompt_ids) + len(t2.completion_ids):]
    assert tok.decode(rest).startswith("<|im_end|>\n<|im_start|>user\nu3")  # closes truncation

    # the linear scan (no index) finds the same prefix turn and ids
    assert prompt_ids_for(tok, sess.turns[:2], t3.messages, None, tok.eos_token_id) == (
        t3.prompt_ids, 1)
    samples, report = sess.to_samples(reward=2.0, agent="a", group="g")
    assert report.num_splits == 0 and report.num_samples == 1
    (s,) = samples
    assert s.token_ids == t3.prompt_ids + t3.completion_ids
    gen = [i for i, m in enumerate(s.loss_mask) if m]
    starts = [len(t.prompt_ids) for t in (t1, t2, t3)]
    expected = [p + k for p, t in zip(starts, (t1, t2, t3), strict=True)
                for k in range(len(t.completion_ids))]
    assert gen == expected
    assert [s.logprobs[i] for i in gen] == t1.logprobs + t2.logprobs + t3.logprobs
    assert all(s.logprobs[i] == 0.0 and s.versions[i] == -1
               for i in range(len(s)) if not s.loss_mask[i])
    assert (s.reward, s.agent, s.policy, s.group) == (2.0, "a", "p", "g")
    # ids decode to the transcript rendered by the template (closing the truncated reply)
    assert tok.decode(s.token_ids).startswith(
        tok.apply_chat_template([SYS, {"role": "user", "content": "u1"}, a1,
                                 {"role": "user", "content": "u2"}], tokenize=False))


async def test_tool_call_round_trip_merges(session, tok):
    _gw, engine, client, sess = session
    engine.script = ['<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "done"]
    msgs = [{"role": "user", "content": "add"}]
    _r1, a1 = await chat(client, msgs, tools=TOOLS)
    assert a1["tool_calls"][0]["function"]["name"] == "add"
    msgs += [a1, {"role": "tool", "tool_call_id": a1["tool_calls"][0]["id"], "content": "1"}]
    await chat(client, msgs, tools=TOOLS)
    assert sess.turns[1].prefix_turn == 0
    samples, report = sess.to_samples()
    assert report.num_splits == 0 and len(samples) == 1
    assert tok.decode(samples[0].token_ids).endswith("<|im_start|>tool\n1<|im_end|>\n"
                                                     "<|im_start|>assistant\ndone<|im_end|>")


async def test_edited_history_splits_with_position(session, tok):
    _gw, _engine, client, sess = session
    msgs = [SYS, {"role": "user", "content": "u1"}]
    _, a1 = await chat(client, msgs)
    edited = [{"role": "system", "content": "be long"}, msgs[1], a1,
              {"role": "user", "content": "u2"}]
    await chat(client, edited)
    assert sess.turns[1].prefix_turn is None
    _samples, report = sess.to_samples()
    assert report.num_samples == 2 and report.num_splits == 1
    split = report.splits[0]
    first = sess.turns[0].prompt_ids + sess.turns[0].completion_ids
    pos = next(i for i, (x, y) in enumerate(zip(first, sess.turns[1].prompt_ids, strict=False))
               if x != y)
    assert (split.turn, split.against, split.position) == (1, 0, pos)
    assert tok.decode(first[:pos]) == "<|im_start|>system\nbe"


async def test_n_branches_continue_the_chosen_one(session, tok):
    _gw, engine, client, sess = session
    engine.script = ["left", "right", "after"]
    msgs = [{"role": "user", "content": "pick"}]
    r = await client.chat.completions.create(model="p", messages=msgs, n=2)
    right = r.choices[1].message.model_dump(exclude_none=True, exclude={"refusal"})
    await chat(client, [*msgs, right, {"role": "user", "content": "more"}])
    assert sess.turns[2].prefix_turn == 1
    samples, report = sess.to_samples()
    assert report.num_splits == 1  # the second branch cannot extend the first
    assert [s.meta["turns"] for s in samples] == [[0], [1, 2]]
    assert "right" in tok.decode(samples[1].token_ids)


def test_turns_to_samples_pure():
    def turn(prompt, completion):
        return Turn(prompt, completion, [-0.5] * len(completion), [3] * len(completion),
                    None, None, None, "stop", "r")

    turns = [turn([1, 2], [3]), turn([1, 2, 3, 4], [5, 6]), turn([1, 9], [7])]
    samples, report = turns_to_samples(turns, reward=1.0)
    assert samples[0].token_ids == [1, 2, 3, 4, 5, 6]
    assert samples[0].loss_mask == [0, 0, 1, 0, 1, 1]
    assert samples[0].versions == [-1, -1, 3, -1, 3, 3]
    assert samples[0].logprobs == [0.0, 0.0, -0.5, 0.0, -0.5, -0.5]
    assert samples[1].token_ids == [1, 9, 7]
    assert [(s.turn, s.against, s.position) for s in report.splits] == [(2, 0, 1)]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3),
                          st.lists(st.integers(5, 9), min_size=1, max_size=4)),
                min_size=1, max_size=8))
def test_turns_to_samples_properties(plan):
    """Every completion token lands under the mask exactly once, with its log-prob and
    version; the number of samples is 1 + the number of reported splits."""
    turns, seq = [], [1, 2]
    for k, (extend, extra, completion) in enumerate(plan):
        prompt = (seq + [3] * extra) if extend and turns else [1, 4 + k]
        lps = [-0.1 * (k + 1)] * len(completion)
        turns.append(Turn(prompt, completion, lps, [k] * len(completion), None, None, None,
                          "stop", f"r{k}"))
        seq = prompt + completion
    samples, report = turns_to_samples(turns)
    assert report.num_samples == len(samples) == 1 + report.num_splits
    assert sum(s.num_generated for s in samples) == sum(len(t.completion_ids) for t in turns)
    for s in samples:
        assert len(s.token_ids) == len(s.loss_mask) == len(s.logprobs) == len(s.versions)
        pos = 0
        for t in s.meta["turns"]:
            turn = turns[t]
            assert s.token_ids[: len(turn.prompt_ids)] == turn.prompt_ids
            start = len(turn.prompt_ids)
            end = start + len(turn.completion_ids)
            assert s.token_ids[start:end] == turn.completion_ids
            assert s.loss_mask[start:end] == [1] * len(turn.completion_ids)
            assert s.versions[start:end] == turn.versions
            assert all(m == 0 for m in s.loss_mask[pos:start])
            pos = end
    for split in report.splits:
        prev = samples[split.against].token_ids
        prompt = turns[split.turn].prompt_ids
        assert prev[: split.position] == prompt[: split.position]
        assert split.position == min(len(prev), len(prompt)) or \
            prev[split.position] != prompt[split.position]


async def test_merges_when_eos_is_not_the_end_of_turn_token():
    """Base-model tokenizers: EOS is <|endoftext|>, turns still end with <|im_end|>."""
    from areal_agents.models import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.eos_token = "<|endoftext|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != im_end
    gw = Gateway()
    gw.add_policy("p", [ScriptedEngine(["hi"], tokenizer=tok, eos_id=im_end)], tok)
    assert gw.policies["p"].stop_ids == {tok.eos_token_id, im_end}
    key = await gw.create_session("p")
    client = gw.async_client(key)
    msgs = [{"role": "user", "content": "a"}]
    _, a1 = await chat(client, msgs)
    assert a1["content"] == "hi"
    await chat(client, [*msgs, a1, {"role": "user", "content": "b"}])
    assert gw.session(key).turns[1].prefix_turn == 0
    assert gw.session(key).to_samples()[1].num_splits == 0
