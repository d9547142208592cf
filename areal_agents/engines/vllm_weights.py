"""Safetensors directories for vLLM's in-place ``reload_weights``, tied embeddings included.

vLLM 0.32's in-place reload unties ``lm_head`` from ``embed_tokens``: unless
``lm_head.weight`` is in the files, the head keeps its old values while the embedding changes
(seen on a tied Qwen3). HF exports and ``save_pretrained`` omit that name for tied models, so
for those the directories written here always carry it (a copy of the embedding).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"  # the tied pair (HF names)


def ties_embeddings(model_dir: str | Path) -> bool:
    """Whether the HF model in ``model_dir`` ties ``lm_head`` to the input embedding
    (``tie_word_embeddings`` of ``config.json`` or its ``text_config``; False when unknown)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def write_tensors(named_tensors: Iterable[tuple[str, Any]], folder: Path, *, tied: bool) -> str:
    """Write HF-named tensors as ``folder/model.safetensors`` (plus the head when ``tied``)."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, tensor in named_tensors:
        t = tensor.detach().cpu().contiguous()
        if t.data_ptr() in seen:  # tied weights share storage; safetensors refuses that
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    if tied and EMBED in tensors and HEAD not in tensors:
        tensors[HEAD] = tensors[EMBED].clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


def missing_head(path: str | Path) -> bool:
    """Whether the safetensors in ``path`` hold the embedding but not ``lm_head.weight``."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), "pt") as reader:
            names.update(reader.keys())
    return EMBED in names and HEAD not in names


def with_head(path: str | Path, folder: Path) -> str:
    """``folder`` linking ``path``'s safetensors plus ``lm_head.weight`` = the embedding
    (``path`` itself is left untouched; its index file is not linked, so vLLM reads all)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for file in sorted(Path(path).glob("*.safetensors")):
        (folder / file.name).symlink_to(file.resolve())
        with safe_open(str(file), "pt") as reader:
            if EMBED in reader.keys():  # noqa: SIM118 (safe_open has no __contains__)
                save_file({HEAD: reader.get_tensor(EMBED)},
                          str(folder / "tied-lm-head.safetensors"))
    return str(folder)
