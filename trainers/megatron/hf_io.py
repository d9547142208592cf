"""Read a HF checkpoint directory lazily: one tensor at a time, no ``transformers`` model.

``MegatronEngine`` builds each rank's shards from it, so a rank never holds the whole HF
model: peak extra memory is the largest fused tensor (one layer's QKV or gate/up).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """``name -> tensor`` over ``model.safetensors`` or a sharded ``*.safetensors.index.json``.

    Tensors are read on access (``safetensors.safe_open``); nothing is cached.

    Raises:
        FileNotFoundError: the directory has no safetensors weights.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.path / file for name, file in weight_map.items()}
        else:
            from safetensors import safe_open

            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"no *.safetensors weights in {str(self.path)!r}; save the model with "
                    "save_pretrained(..., safe_serialization=True)"
                )
            self._files = {}
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    self._files.update(dict.fromkeys(f.keys(), file))

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._files[name]
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def read_hf_directory(path: str | Path) -> tuple[Any, SafetensorsCheckpoint, Any]:
    """``(config, lazy tensors, tokenizer or None)`` of a HF checkpoint directory.

    Raises:
        FileNotFoundError: ``path`` is not a directory with ``config.json`` and safetensors.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no HF checkpoint at {str(path)!r} (config.json missing); pass a checkpoint "
            "directory, a transformers model or a tiny spec such as 'tiny:xs'"
        )
    config = AutoConfig.from_pretrained(path)
    tensors = SafetensorsCheckpoint(path)
    tokenizer = None  # transformers would build an empty tokenizer from the config alone
    if any((path / f).exists() for f in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return config, tensors, tokenizer


def hf_source(model_or_path: nn.Module | str) -> tuple[Any, Mapping[str, torch.Tensor], Any]:
    """``(HF config, name -> tensor, tokenizer or None)`` of a model, a spec or a directory.

    A checkpoint directory is read lazily (``read_hf_directory``): no model is built.
    """
    if isinstance(model_or_path, nn.Module):
        return model_or_path.config, model_or_path.state_dict(), None
    from areal_agents.models import load, parse_tiny_spec

    if parse_tiny_spec(str(model_or_path)) is not None:
        model, tokenizer = load(model_or_path, dtype=torch.float32)
        return model.config, model.state_dict(), tokenizer
    return read_hf_directory(model_or_path)
