"""Load a model and tokenizer from a checkpoint directory or a ``tiny[:size][:seed=N]`` spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .tiny import SIZES, tiny


def parse_tiny_spec(spec: str) -> tuple[str, int] | None:
    """``"tiny"`` -> ("xs", 0); ``"tiny:s"`` -> ("s", 0); ``"tiny:m:seed=3"`` -> ("m", 3).

    Returns None when ``spec`` is not a tiny spec (does not start with "tiny").

    Raises:
        ValueError: a malformed tiny spec (names the expected form).
    """
    parts = spec.split(":")
    if parts[0] != "tiny":
        return None
    size, seed = "xs", 0
    for part in parts[1:]:
        if part.startswith("seed="):
            try:
                seed = int(part[len("seed="):])
            except ValueError:
                raise ValueError(f"bad seed in model spec {spec!r}; expected e.g. 'tiny:s:seed=3'") from None
        elif part in SIZES:
            size = part
        else:
            raise ValueError(
                f"bad model spec {spec!r}: {part!r} is neither a size {sorted(SIZES)} nor 'seed=N'"
            )
    return size, seed


def load(path_or_spec: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu",
         **model_kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        path_or_spec: a directory with an HF checkpoint (``config.json``, weights, tokenizer),
            e.g. one written by ``save_tiny`` or a downloaded ``Qwen/Qwen3-0.6B``; or a spec
            ``"tiny"``, ``"tiny:s"``, ``"tiny:m:seed=3"`` built in memory.
        dtype: parameter dtype (None: the checkpoint's, float32 for tiny models).
        device: where to put the model.
        **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        FileNotFoundError: the path does not exist and is not a tiny spec.
        ValueError: a malformed tiny spec.
    """
    spec = parse_tiny_spec(str(path_or_spec))
    if spec is not None:
        model, tokenizer = tiny(spec[0], seed=spec[1])
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device).eval(), tokenizer
    path = Path(path_or_spec)
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: pass an existing HF checkpoint directory or a tiny "
            "spec such as 'tiny', 'tiny:s' or 'tiny:m:seed=3' (there is no model hub offline)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = dict(model_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval(), tokenizer
