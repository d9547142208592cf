"""Load a model and tokenizer from a ``tiny[:size][:seed=N]`` spec, a checkpoint directory or a
hub id in the local Hugging Face cache; the dtype default and the checkpoint's stop ids."""

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

from .hub import is_hub_id, resolve_hub_id
from .tiny import SIZES, tiny

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


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


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """The checkpoint directory of an existing path, or of a hub id (``"Qwen/Qwen3-0.6B"``)
    found in the local Hugging Face cache (``areal_agents.models.hub``; never downloads).

    An existing directory wins over a hub id of the same name.

    Raises:
        FileNotFoundError: a path (absolute, ``./``-relative, or with more than one ``/``)
            that does not exist.
        ConfigError: a hub id absent from the cache (names the cache searched and the
            ``hf download`` command).
    """
    path = Path(path_or_id)
    if path.exists():
        return path
    if isinstance(path_or_id, str) and is_hub_id(path_or_id):
        return resolve_hub_id(path_or_id)
    raise FileNotFoundError(
        f"no checkpoint at {str(path)!r}: pass an existing HF checkpoint directory, a hub id "
        "in the local Hugging Face cache such as 'Qwen/Qwen3-0.6B', or a tiny spec such as "
        "'tiny', 'tiny:s' or 'tiny:m:seed=3'"
    )


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device = "cpu"
                  ) -> torch.dtype | str:
    """The parameter dtype to load with: ``None`` means bfloat16 on CUDA, float32 elsewhere;
    ``"auto"`` keeps the checkpoint's; names such as ``"bf16"`` / ``"float32"`` are accepted.

    Example:
        >>> resolve_dtype(None, "cpu"), resolve_dtype(None, "cuda:1"), resolve_dtype("bf16")
        (torch.float32, torch.bfloat16, torch.bfloat16)

    Raises:
        ValueError: an unknown dtype name (lists the known ones).
    """
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto' "
                         "(the checkpoint's)")
    return _DTYPES[name]


def load(path_or_spec: str | Path, *, dtype: torch.dtype | str | None = None,
         device: str = "cpu", **model_kwargs: Any
         ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode.

    The tokenizer (with its chat template) and ``model.generation_config`` (with the
    checkpoint's ``eos_token_id``, possibly a list) come from the checkpoint; see
    ``eos_token_ids``.

    Args:
        path_or_spec: a directory with an HF checkpoint (``config.json``, weights, tokenizer),
            e.g. one written by ``save_tiny``; a hub id such as ``"Qwen/Qwen3-0.6B"`` already in
            the local Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``; never downloaded);
            or a spec ``"tiny"``, ``"tiny:s"``, ``"tiny:m:seed=3"`` built in memory.
        dtype: parameter dtype (``torch_dtype`` is accepted as an alias): None = bfloat16 on
            CUDA and float32 on the CPU (also for checkpoints saved in bfloat16: CPU training
            and exact log-probs want float32); ``"auto"`` = the checkpoint's.
        device: where to put the model.
        **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        FileNotFoundError: a path that does not exist (and is neither a spec nor a hub id).
        ConfigError: a hub id that is not in the local cache (names the download command).
        ValueError: a malformed tiny spec, an unknown dtype name, or both ``dtype`` and
            ``torch_dtype``.
    """
    if "torch_dtype" in model_kwargs:
        if dtype is not None:
            raise ValueError("pass dtype= or torch_dtype= (its alias), not both")
        dtype = model_kwargs.pop("torch_dtype")
    resolved = resolve_dtype(dtype, device)
    spec = parse_tiny_spec(str(path_or_spec))
    if spec is not None:
        model, tokenizer = tiny(spec[0], seed=spec[1])
        if resolved != "auto":
            model = model.to(resolved)
        return model.to(device).eval(), tokenizer
    path = resolve_checkpoint(path_or_spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolved, **model_kwargs)
    return model.to(device).eval(), tokenizer


def eos_token_ids(model: Any, tokenizer: Any = None) -> frozenset[int]:
    """The token ids that end a generation: the checkpoint's ``generation_config.eos_token_id``
    (an int or a list: all of them), else ``config.eos_token_id``, plus the tokenizer's EOS.

    Example:
        >>> model, tok = tiny("xs")
        >>> model.generation_config.eos_token_id = [tok.eos_token_id, 0]
        >>> sorted(eos_token_ids(model, tok)) == sorted({tok.eos_token_id, 0})
        True
    """
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None)
    if value is None:
        value = getattr(getattr(model, "config", None), "eos_token_id", None)
    if value is not None:
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
