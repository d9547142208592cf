"""Tool-call parsers per model family, their per-policy selection, and the gateway end to end.

Family tokenizers are the tiny tokenizer with its special tokens renamed to a family's markers
(same vocabulary size), and chat templates that render tool calls the way that family writes
them, so a scripted reply in the family's format round-trips through the template.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from areal_agents.config import load_config
from areal_agents.errors import ConfigError
from areal_agents.gateway import Gateway
from areal_agents.gateway.chat import render
from areal_agents.gateway.tool_parsing import (
    TOOL_PARSER_NAMES,
    ResponseTemplateParser,
    auto_tool_parser,
    check_tool_parser,
    gpt_oss,
    hermes,
    llama3_json,
    mistral,
    tool_parser_for,
)
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.policy import Policy

PARSERS = {"hermes": hermes, "llama3_json": llama3_json, "mistral": mistral, "gpt_oss": gpt_oss}
NESTED = {"query": {"city": "Paris", "days": [1, 2]}, "units": "metric"}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]

# (family, completion text, expected content, expected [(name, arguments)])
CASES = [
    ("hermes", 'I will look.\n<tool_call>{"name": "weather", "arguments": '
     + json.dumps(NESTED) + '}</tool_call>\n<tool_call>{"name": "time", "arguments": {}}'
     "</tool_call>", "I will look.", [("weather", NESTED), ("time", {})]),
    ("llama3_json", '{"name": "weather", "parameters": ' + json.dumps(NESTED) + "}",
     None, [("weather", NESTED)]),
    ("llama3_json", '{"name": "weather", "parameters": {"city": "Oslo"}}; '
     '{"name": "time", "parameters": {"tz": "CET"}}<|eom_id|>',
     None, [("weather", {"city": "Oslo"}), ("time", {"tz": "CET"})]),
    ("llama3_json", 'Let me check.<|python_tag|>{"name": "weather", "arguments": '
     + json.dumps(NESTED) + "}", "Let me check.", [("weather", NESTED)]),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "weather", "arguments": ' + json.dumps(NESTED)
     + '}, {"name": "time", "arguments": {}}]</s>', "Sure.",
     [("weather", NESTED), ("time", {})]),
    ("mistral", "[TOOL_CALLS] [{\"name\": \"time\", \"arguments\": {\"tz\": \"UTC\"}}]", None,
     [("time", {"tz": "UTC"})]),
    ("mistral", "Two calls.[TOOL_CALLS]weather[ARGS]" + json.dumps(NESTED)
     + "[TOOL_CALLS]time[CALL_ID]a1b2c3d4e[ARGS]{}", "Two calls.",
     [("weather", NESTED), ("time", {})]),
    ("gpt_oss", "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
     "<|channel|>commentary to=functions.weather <|constrain|>json<|message|>"
     + json.dumps(NESTED) + "<|call|>", "<|channel|>analysis<|message|>Need the weather.<|end|>",
     [("weather", NESTED)]),
    ("gpt_oss", ' to=functions.time<|channel|>commentary json<|message|>{"tz": "UTC"}', None,
     [("time", {"tz": "UTC"})]),
    ("gpt_oss", '<|channel|>commentary to=functions.weather json<|message|>{"city": "Rome"}'
     "<|call|><|start|>assistant to=functions.time<|channel|>commentary json<|message|>{}"
     "<|call|>", None, [("weather", {"city": "Rome"}), ("time", {})]),
]

MALFORMED = {
    "hermes": ['<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
               '<tool_call>{"arguments": {}}</tool_call>',
               '<tool_call>{"name": "f", "arguments": {}}'],
    "llama3_json": ['{"name": "f", "parameters": {"a": 1}',
                    '{"name": 3, "parameters": {}}',
                    '{"name": "f", "parameters": {}} and then some text',
                    '{"name": "f", "parameters": [1]}',
                    '{"answer": 42}',
                    'Searching.<|python_tag|>brave_search.call(query="weather")'],
    "mistral": ['[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}',
                '[TOOL_CALLS]{"name": "f", "arguments": {}}',
                "[TOOL_CALLS]f[ARGS]{bad json}",
                '[TOOL_CALLS][{"arguments": {}}]',
                "[TOOL_CALLS]two words[ARGS]{}",
                '[TOOL_CALLS][{"name": "f", "arguments": {}}] and more'],
    "gpt_oss": ["<|channel|>commentary to=functions.f json<|message|>{bad<|call|>",
                '<|channel|>commentary to=functions.f json<|message|>{"a": 1}<|end|>',
                "<|channel|>commentary to=functions.f json<|call|>",
                '<|channel|>commentary to=functions.f json<|message|>["a"]<|call|>'],
}

NO_CALL = {"hermes": "just text <think>x</think>", "llama3_json": "The answer is 4.",
           "mistral": "No tools needed.</s>",
           "gpt_oss": "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant"
                      "<|channel|>final<|message|>4<|return|>"}


def _calls(calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize(("family", "text", "content", "expected"), CASES)
def test_each_family_parses_its_format(family, text, content, expected):
    got_content, calls = PARSERS[family](text)
    assert got_content == content
    assert _calls(calls) == expected
    assert all(c["type"] == "function" and isinstance(c["function"]["arguments"], str)
               for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize(("family", "text"), [(f, t) for f, ts in MALFORMED.items() for t in ts])
def test_malformed_calls_are_the_whole_text_as_content(family, text):
    assert PARSERS[family](text) == (text, [])


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_replies_without_calls_are_unchanged(family):
    assert PARSERS[family](NO_CALL[family]) == (NO_CALL[family], [])
    assert PARSERS[family]("") == ("", [])


def test_mistral_ids_are_nine_alphanumerics_and_a_valid_written_id_is_kept():
    _, calls = mistral('[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "abcDEF123"}, '
                       '{"name": "g", "arguments": {}, "id": "too-long-id"}]')
    assert calls[0]["id"] == "abcDEF123"
    assert len(calls[1]["id"]) == 9 and calls[1]["id"].isalnum()
    _, (call,) = hermes('<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert call["id"].startswith("call_")


# ---- the tokenizer's response schema (transformers' parse_response) ----------------------

SCHEMA = {  # hermes-style calls of the tiny ChatML tokenizer, as a transformers response_template
    "defaults": {"role": "assistant"}, "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "reasoning_content": {"open": "<think>", "close": "</think>"},
        "tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>",
                       "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"\s*<\|im_end\|>"},
    },
}


@pytest.fixture
def schema_tok(tok):
    copy = _retokenizer(tok, {}, eos=tok.eos_token, template=tok.chat_template)
    copy.response_template = SCHEMA
    return copy


def test_auto_uses_the_tokenizers_response_template(schema_tok):
    assert auto_tool_parser(schema_tok) == "response_template"
    parse = tool_parser_for("auto", schema_tok)
    assert isinstance(parse, ResponseTemplateParser)
    content, calls = parse('<think>hm</think>Sure.\n<tool_call>{"name": "weather", "arguments": '
                           + json.dumps(NESTED) + '}</tool_call>\n<tool_call>{"name": "time", '
                           '"arguments": {}}</tool_call>')
    assert content == "Sure."  # the schema's content field; its reasoning is not content
    assert _calls(calls) == [("weather", NESTED), ("time", {})]
    bad = '<tool_call>{"name": "weather", "arguments": {</tool_call>'
    assert parse(bad) == (bad, [])
    assert parse("no call") == ("no call", [])


async def test_response_template_calls_through_the_gateway(schema_tok):
    gw = Gateway()
    script = ['<think>hm</think>Sure.\n<tool_call>{"name": "add", "arguments": {"a": 1}}'
              "</tool_call>", "3"]
    gw.add_policy("p", [ScriptedEngine(script, tokenizer=schema_tok)], schema_tok)  # auto
    key = await gw.create_session("p")
    client = gw.async_client(key)
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "add"}]
    r = await client.chat.completions.create(model="p", messages=msgs, tools=TOOLS)
    reply = r.choices[0].message
    assert (reply.content, reply.tool_calls[0].function.name,
            reply.tool_calls[0].function.arguments) == ("Sure.", "add", '{"a": 1}')
    msgs += [reply.model_dump(exclude_none=True, exclude={"refusal"}),
             {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": "1"}]
    await client.chat.completions.create(model="p", messages=msgs, tools=TOOLS)
    samples, report = gw.session(key).to_samples()  # the generated think text stays in the ids
    assert report.num_splits == 0 and len(samples) == 1
    assert "<think>hm</think>Sure." in schema_tok.decode(samples[0].token_ids)
    await gw.close()


def test_response_template_needs_a_schema_with_tool_calls(tok):
    with pytest.raises(ConfigError, match=r"^tool_parser='response_template' needs a tokenizer "
                       r"whose response_template has a 'tool_calls' field; pick another "
                       r"tool_parser: \['auto', 'hermes', 'llama3_json', 'mistral', 'gpt_oss', "
                       r"'response_template'\]$"):
        tool_parser_for("response_template", tok)


# ---- family tokenizers and templates ------------------------------------------------------

def _retokenizer(tok: Any, rename: dict[str, str], eos: str, template: str,
                 extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with special tokens renamed (same ids), ``eos`` and ``template``."""
    raw = tok.backend_tokenizer.to_str()
    for old, new in rename.items():
        raw = raw.replace(json.dumps(old), json.dumps(new))
    specials = [rename.get(t, t) for t in tok.all_special_tokens if t != tok.pad_token]
    out = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw),
                                  pad_token=tok.pad_token, eos_token=eos, bos_token=None,
                                  unk_token=None, model_max_length=4096,
                                  additional_special_tokens=[*specials, *extra])
    out.chat_template = template
    return out


LLAMA = (
    "{%- for m in messages -%}"
    "<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>"
    "{{ '\\n\\n' }}"
    "{%- if m.tool_calls -%}"
    "{%- if m.content -%}{{ m.content }}<|python_tag|>{%- endif -%}"
    "{%- for tc in m.tool_calls -%}{{ '; ' if not loop.first else '' }}"
    "{{ '{\"name\": \"' + tc.function.name + '\", \"parameters\": ' }}"
    "{{ tc.function.arguments | tojson }}{{ '}' }}"
    "{%- endfor -%}"
    "{%- else -%}{{ m.content }}{%- endif -%}<|eot_id|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start_header_id|>assistant<|end_header_id|>{{ '\\n\\n' }}"
    "{%- endif -%}")
MISTRAL = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'tool' -%}[INST]result: {{ m.content }}[/INST]"
    "{%- else -%}{{ m.content or '' }}"
    "{%- for tc in m.tool_calls or [] -%}"
    "[TOOL_CALLS]{{ tc.function.name }}[ARGS]{{ tc.function.arguments | tojson }}"
    "{%- endfor -%}</s>"
    "{%- endif -%}"
    "{%- endfor -%}")
HARMONY = (
    "{%- for m in messages -%}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}")

FAMILIES = {  # family -> (renamed special tokens, eos, template, extra special tokens)
    "llama3_json": ({"<|im_start|>": "<|start_header_id|>", "</tool_call>": "<|end_header_id|>",
                     "<|im_end|>": "<|eot_id|>", "<tool_call>": "<|python_tag|>"},
                    "<|eot_id|>", LLAMA, ()),
    "mistral": ({"<|im_start|>": "[INST]", "</tool_call>": "[/INST]", "<|im_end|>": "</s>",
                 "<tool_call>": "[TOOL_CALLS]"}, "</s>", MISTRAL, ()),
    "gpt_oss": ({"<|im_start|>": "<|start|>", "</tool_call>": "<|message|>",
                 "<|im_end|>": "<|return|>", "<tool_call>": "<|channel|>"}, "<|return|>",
                HARMONY, ("<|end|>", "<|call|>", "<|constrain|>")),
}


def family_tokenizer(tok: Any, family: str) -> Any:
    if family == "hermes":
        return tok
    rename, eos, template, extra = FAMILIES[family]
    return _retokenizer(tok, rename, eos, template, extra)


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_auto_picks_the_family_its_vocabulary_shows(tok, family):
    assert auto_tool_parser(family_tokenizer(tok, family)) == family
    assert tool_parser_for("auto", family_tokenizer(tok, family)) is PARSERS[family]


# ---- end to end: openai SDK -> gateway -> scripted engine -> parser -> next turn ----------

FIRST_REPLY = {  # what each family's model writes to call add(a=1, b={"c": [2]}), minus EOS
    "hermes": 'Adding.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": {"c": [2]}}}'
              "</tool_call>",
    "llama3_json": 'Adding.<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": {"c": [2]}}}',
    "mistral": 'Adding.[TOOL_CALLS]add[ARGS]{"a": 1, "b": {"c": [2]}}',
}


@pytest.mark.parametrize("family", sorted(FIRST_REPLY))
async def test_tool_call_turn_round_trips_through_the_gateway(tok, family):
    tokenizer = family_tokenizer(tok, family)
    gw = Gateway()
    engine = ScriptedEngine([FIRST_REPLY[family], "It is 3."], tokenizer=tokenizer)
    gw.add_policy("p", [engine], tokenizer, tool_parser=family)
    key = await gw.create_session("p")
    client = gw.async_client(key)
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "add 1 and 2"}]
    r1 = await client.chat.completions.create(model="p", messages=msgs, tools=TOOLS)
    assert r1.choices[0].finish_reason == "tool_calls"
    reply = r1.choices[0].message
    assert reply.content == "Adding."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.tool_calls] == [
        ("add", {"a": 1, "b": {"c": [2]}})]
    a1 = reply.model_dump(exclude_none=True, exclude={"refusal"})
    msgs += [a1, {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": "3"}]
    await client.chat.completions.create(model="p", messages=msgs, tools=TOOLS)
    session = gw.session(key)
    t1, t2 = session.turns
    # the parsed reply re-rendered by the template is the text of the engine's exact ids
    generated = tokenizer.decode(t1.prompt_ids + t1.completion_ids)
    rendered = render(tokenizer, msgs[:2], TOOLS, add_generation_prompt=False)
    assert rendered[:len(generated)] == generated and rendered[len(generated):] in ("", "\n")
    # and the tokenization contract holds: the next prompt extends them, one sample
    assert t2.prefix_turn == 0
    assert t2.prompt_ids[:len(t1.prompt_ids) + len(t1.completion_ids)] == (
        t1.prompt_ids + t1.completion_ids)
    samples, report = session.to_samples()
    assert report.num_splits == 0 and len(samples) == 1
    await gw.close()


async def test_gpt_oss_calls_through_the_gateway(tok):
    tokenizer = family_tokenizer(tok, "gpt_oss")
    reply = ("<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant<|channel|>"
             'commentary to=functions.add <|constrain|>json<|message|>{"a": 1}<|call|>')
    gw = Gateway()
    gw.add_policy("p", [ScriptedEngine([reply], tokenizer=tokenizer)], tokenizer)  # auto
    r = await gw.async_client().chat.completions.create(
        model="p", messages=[{"role": "user", "content": "add"}], tools=TOOLS)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert message.content == "<|channel|>analysis<|message|>Add them.<|end|>"
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("add", '{"a": 1}')]
    await gw.close()


async def test_tool_choice_none_and_malformed_calls_stay_content(tok):
    tokenizer = family_tokenizer(tok, "mistral")
    bad = "[TOOL_CALLS]add[ARGS]{not json"
    gw = Gateway()
    gw.add_policy("p", [ScriptedEngine([bad, FIRST_REPLY["mistral"]], tokenizer=tokenizer)],
                  tokenizer, tool_parser="mistral")
    client = gw.async_client()
    msgs = [{"role": "user", "content": "add"}]
    r = await client.chat.completions.create(model="p", messages=msgs, tools=TOOLS)
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == (bad, None)
    assert r.choices[0].finish_reason == "stop"
    r = await client.chat.completions.create(model="p", messages=msgs, tools=TOOLS,
                                             tool_choice="none")
    assert r.choices[0].message.content == FIRST_REPLY["mistral"]
    await gw.close()


# ---- selection: Python, YAML, Gateway, Trainer --------------------------------------------

CHOICES = r"\['auto', 'hermes', 'llama3_json', 'mistral', 'gpt_oss', 'response_template'\]"


def test_names_and_bad_names():
    assert TOOL_PARSER_NAMES == ("auto", "hermes", "llama3_json", "mistral", "gpt_oss",
                                 "response_template")
    assert check_tool_parser("mistral") == "mistral"
    with pytest.raises(ConfigError, match=rf"^tool_parser='qwen': unknown tool-call parser; "
                       rf"choose one of {CHOICES}$"):
        check_tool_parser("qwen")


def test_policy_selects_a_parser_and_rejects_unknown_names():
    assert Policy().tool_parser == "auto"
    assert Policy(tool_parser="mistral").tool_parser == "mistral"
    with pytest.raises(ConfigError, match=rf"^Policy\.tool_parser='harmony': unknown tool-call "
                       rf"parser; choose one of {CHOICES}$"):
        Policy(tool_parser="harmony")


def test_yaml_selects_a_parser_and_rejects_unknown_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("env: Signaling-v0\npolicy_map: {speaker: s, listener: s}\n"
                    "policies:\n  s: {model: 'tiny:xs', tool_parser: llama3_json}\n")
    assert load_config(path).policies["s"].tool_parser == "llama3_json"
    assert load_config(path, ["policies.s.tool_parser=gpt_oss"]).policies["s"].tool_parser == (
        "gpt_oss")
    with pytest.raises(ConfigError, match=rf"policies\.s\.tool_parser: Value error, "
                       rf"tool_parser='llama': unknown tool-call parser; choose one of {CHOICES}"):
        load_config(path, ["policies.s.tool_parser=llama"])


def test_gateway_add_policy_resolves_the_parser(tok):
    gw = Gateway()
    assert gw.add_policy("a", [ScriptedEngine()], tok).tool_parser is hermes  # auto, ChatML
    assert gw.add_policy("b", [ScriptedEngine()], tok, tool_parser="gpt_oss").tool_parser is (
        gpt_oss)
    with pytest.raises(ConfigError, match=r"^tool_parser='x': unknown tool-call parser"):
        gw.add_policy("c", [ScriptedEngine()], tok, tool_parser="x")
    assert "c" not in gw.policies


async def test_trainer_serves_each_policy_with_its_parser(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"env: Signaling-v0\npolicy_map: {{speaker: s, listener: l}}\n"
                    f"run_dir: {tmp_path}\nlogging: {{progress: false, tensorboard: false}}\n"
                    "policies:\n  s: {frozen: true, tool_parser: mistral}\n"
                    "  l: {model: 'tiny:xs'}\ntrainer: {batch_size: 4, group_size: 4}\n")
    trainer = load_config(path).build()
    try:
        await trainer.setup()
        assert trainer.gateway.policies["s"].tool_parser is mistral
        assert trainer.gateway.policies["l"].tool_parser is hermes
    finally:
        await trainer.aclose()


def test_serve_cli_selects_a_parser_and_rejects_unknown_names(capsys):
    from areal_agents.cli import main
    from areal_agents.cli_serve import build_gateway

    assert build_gateway("tiny", tool_parser="llama3_json").policies["tiny"].tool_parser is (
        llama3_json)
    assert main(["serve", "--model", "tiny", "--tool-parser", "pythonic"]) == 2
    assert capsys.readouterr().err == (
        "error: --tool-parser='pythonic': unknown tool-call parser; choose one of ['auto', "
        "'hermes', 'llama3_json', 'mistral', 'gpt_oss', 'response_template']\n")
