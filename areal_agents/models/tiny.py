"""Tiny offline models: a byte-level BPE tokenizer and seeded Qwen3 models of 0.5M-50M params."""

from __future__ import annotations

import functools
import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, "<tool_call>", "</tool_call>"]
VOCAB_SIZE = 1024

# size -> Qwen3Config fields (parameter counts include the tied embedding)
SIZES: dict[str, dict[str, int]] = {
    "xs": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "s": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "m": dict(hidden_size=384, intermediate_size=1280, num_hidden_layers=5,
              num_attention_heads=6, num_key_value_heads=3, head_dim=64),
    "l": dict(hidden_size=768, intermediate_size=1920, num_hidden_layers=8,
              num_attention_heads=12, num_key_value_heads=6, head_dim=64),
}

_WORDS_TEXT = (
    "Answer answer higher lower correct wrong guess number target the a an is of to and you your "
    "move board cell row column player X O win lose draw invalid turn game over reward score "
    "system user assistant tool function name arguments result error true false null calculator "
    "add subtract multiply divide expression value solve question step think final please make "
    "equals countdown numbers use each once reach Wordle letters green yellow gray word position "
    "hello world yes no ok Let me compute first then next so The is: I will call"
)
_WORDS = _WORDS_TEXT.split()


def _corpus(num_lines: int = 6000, seed: int = 1234) -> list[str]:
    """Deterministic training text resembling what the project's envs and agents exchange."""
    rng = random.Random(seed)
    ops = "+-*/"
    lines: list[str] = []
    for i in range(num_lines):
        kind = i % 6
        if kind == 0:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice(ops)
            lines.append(f"{a} {op} {b} = ? Answer: ({a}{op}{b}) = {rng.randint(-999, 9999)}")
        elif kind == 1:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + ".")
        elif kind == 2:
            lines.append(f"Guess {rng.randint(1, 100)}: {rng.choice(['higher', 'lower', 'correct'])}")
        elif kind == 3:
            cells = [rng.choice("XO.") for _ in range(9)]
            rows = ["|".join(cells[r * 3:r * 3 + 3]) for r in range(3)]
            lines.append("\n".join(rows) + f"\nMove: {rng.randint(0, 8)} row {rng.randint(0, 2)}")
        elif kind == 4:
            call = {"name": rng.choice(["calculator", "add", "search", "move"]),
                    "arguments": {"expression": f"{rng.randint(0, 99)}*{rng.randint(0, 99)}",
                                  "x": rng.randint(0, 9)}}
            lines.append(f"<tool_call>{json.dumps(call)}</tool_call>")
        else:
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
            lines.append(f"{word.upper()} {word} [{rng.randint(0, 9)}, {rng.random():.3f}] {{}}")
    return lines


def chat_template() -> str:
    """The ChatML chat template (Jinja) shipped with the package."""
    return resources.files(__package__).joinpath("chat_template.jinja").read_text()


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab <= 1024) with ChatML special tokens and chat template.

    Trained in about a second on project-generated text and cached in-process (a fresh
    ``PreTrainedTokenizerFast`` is returned each call). Deterministic: the same ids every run.
    Special tokens: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos),
    ``<tool_call>``, ``</tool_call>``.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=None, unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=4096,
    )
    tokenizer.chat_template = chat_template()
    return tokenizer


def tiny_config(size: str = "xs", **overrides: Any) -> Qwen3Config:
    """The ``Qwen3Config`` of a tiny size ("xs", "s", "m", "l"); keyword overrides win."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose one of {sorted(SIZES)}")
    tokenizer = tiny_tokenizer()
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_theta=10000.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    fields.update(SIZES[size])
    fields.update(overrides)
    return Qwen3Config(**fields)


def tiny(size: str = "xs", *, seed: int = 0, **config_overrides: Any
         ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A seeded tiny ``Qwen3ForCausalLM`` (float32, tied embeddings, eval mode) and its tokenizer.

    Args:
        size: "xs" (~0.5M params), "s" (~2.6M), "m" (~10M) or "l" (~50M).
        seed: initialisation seed; the same seed gives bit-identical weights.
        **config_overrides: ``Qwen3Config`` fields to change (e.g. ``num_hidden_layers=1``).

    Raises:
        ValueError: unknown size.

    Example:
        >>> model, tok = tiny("xs", seed=0)
        >>> model.config.model_type, tok.eos_token
        ('qwen3', '<|im_end|>')
    """
    config = tiny_config(size, **config_overrides)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    return model, tiny_tokenizer()


def save_tiny(path: str | Path, size: str = "xs", seed: int = 0, **config_overrides: Any) -> Path:
    """Build ``tiny(size, seed=seed)`` and ``save_pretrained`` model and tokenizer into ``path``."""
    path = Path(path)
    model, tokenizer = tiny(size, seed=seed, **config_overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
