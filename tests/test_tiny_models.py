"""The tiny-model factory: sizes, determinism, tokenizer, chat template, save/load round trip."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from transformers import Qwen3ForCausalLM

from areal_agents.models import load, parse_tiny_spec, save_tiny, tiny, tiny_tokenizer
from areal_agents.models.tiny import SIZES

TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("size", "low", "high"), [("xs", 0.4e6, 0.6e6), ("s", 2.2e6, 3e6)])
def test_sizes_and_architecture(size: str, low: float, high: float) -> None:
    model, tok = tiny(size)
    assert isinstance(model, Qwen3ForCausalLM)
    assert low < _num_params(model) < high
    assert next(model.parameters()).dtype == torch.float32
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert model.config.vocab_size >= len(tok)
    assert not model.training


def test_large_size_configs() -> None:
    # parameter counts from the config alone (building "l" takes a few seconds)
    def count(c: dict) -> int:
        h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
        per_layer = h * q * 2 + h * kv * 2 + 3 * h * i + 2 * h + 2 * c["head_dim"]
        return 1024 * h + layers * per_layer + h
    assert 9e6 < count(SIZES["m"]) < 11e6
    assert 45e6 < count(SIZES["l"]) < 55e6


def test_seeded_init_is_deterministic_and_leaves_global_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, _ = tiny("xs", seed=3)
    assert torch.equal(torch.rand(1), expected_next)  # global RNG untouched
    b, _ = tiny("xs", seed=3)
    c, _ = tiny("xs", seed=4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_config_overrides() -> None:
    model, _ = tiny("xs", num_hidden_layers=1)
    assert len(model.model.layers) == 1


def test_unknown_size() -> None:
    with pytest.raises(ValueError, match="unknown tiny size 'xxl'"):
        tiny("xxl")


def test_tokenizer_special_tokens_and_round_trip() -> None:
    tok = tiny_tokenizer()
    assert 900 <= len(tok) <= 1024
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>",
                                     "</tool_call>"])
    assert ids == [0, 1, 2, 3, 4]
    text = 'Answer: (12+7)*3 = 57 higher lower X|O|. {"name": "calc"} ünïcode 😀'
    encoded = tok.encode(text, add_special_tokens=False)
    assert tok.decode(encoded) == text
    assert tok.encode("<tool_call>{}</tool_call>", add_special_tokens=False)[0] == 3
    # project text compresses: common words are single tokens
    assert len(tok.tokenize(" higher")) == 1 and len(tok.tokenize(" Answer")) == 1


def test_tokenizer_is_deterministic() -> None:
    tiny_module = importlib.import_module("areal_agents.models.tiny")
    first = tiny_tokenizer().get_vocab()
    tiny_module._tokenizer_json.cache_clear()
    assert tiny_tokenizer().get_vocab() == first


def test_chat_template_renders_roles_tools_and_tool_calls() -> None:
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(TOOLS[0]) in text
    assert ('<|im_start|>assistant\n<tool_call>{"name": "calculator", "arguments": '
            '{"expression": "2+3"}}</tool_call><|im_end|>\n') in text
    assert text.endswith("<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n")
    # dict arguments and no system message: tools get their own system turn
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Sure.", "tool_calls": [
                {"function": {"name": "calculator", "arguments": {"expression": "1"}}},
                {"function": {"name": "calculator", "arguments": {"expression": "2"}}}]}]
    text = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools")
    assert text.endswith('Sure.\n<tool_call>{"name": "calculator", "arguments": {"expression": "1"}}'
                         '</tool_call>\n<tool_call>{"name": "calculator", "arguments": '
                         '{"expression": "2"}}</tool_call><|im_end|>\n')
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_template_is_prefix_preserving(tools: list | None) -> None:
    tok = tiny_tokenizer()
    history = [{"role": "system", "content": "Play."}, {"role": "user", "content": "Guess 1-100."}]
    prompt = tok.apply_chat_template(history, tools=tools, tokenize=False, add_generation_prompt=True)
    reply = {"role": "assistant", "content": "Answer: 50"}
    with_reply = tok.apply_chat_template([*history, reply], tools=tools, tokenize=False)
    assert with_reply == prompt + "Answer: 50<|im_end|>\n"
    longer = [*history, reply, {"role": "user", "content": "higher"}]
    extended = tok.apply_chat_template(longer, tools=tools, tokenize=False, add_generation_prompt=True)
    assert extended.startswith(with_reply)
    assert extended[len(with_reply):] == "<|im_start|>user\nhigher<|im_end|>\n<|im_start|>assistant\n"


def test_save_load_round_trip(tmp_path) -> None:
    save_tiny(tmp_path / "ckpt", size="xs", seed=5)
    model, tok = load(tmp_path / "ckpt")
    ref, ref_tok = tiny("xs", seed=5)
    assert isinstance(model, Qwen3ForCausalLM)
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    text = "1 + 2 = 3 <|im_end|>"
    assert tok.encode(text) == ref_tok.encode(text)
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref_tok.apply_chat_template(msgs, tokenize=False)
    ids = torch.tensor([tok.encode("12 + 30 =")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_load_specs() -> None:
    assert parse_tiny_spec("tiny") == ("xs", 0)
    assert parse_tiny_spec("tiny:s") == ("s", 0)
    assert parse_tiny_spec("tiny:m:seed=3") == ("m", 3)
    assert parse_tiny_spec("/some/path") is None
    with pytest.raises(ValueError, match="neither a size"):
        parse_tiny_spec("tiny:huge")
    model, _ = load("tiny:xs:seed=2")
    assert torch.equal(model.lm_head.weight, tiny("xs", seed=2)[0].lm_head.weight)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load("/nonexistent/checkpoint")
