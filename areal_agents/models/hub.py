"""Resolve a hub-style model id (``"Qwen/Qwen3-0.6B"``) to a snapshot in the local HF cache.

areal_agents never downloads a model: a hub id is looked up in the local Hugging Face cache
only (``huggingface_hub.snapshot_download(..., local_files_only=True)``), so no network is
touched, with or without ``HF_HUB_OFFLINE=1``. Download once with ``hf download <id>`` (or
``huggingface-cli download <id>``) and every run after that resolves the id offline.

The cache directory is read from the environment at call time, as ``huggingface_hub`` reads it
at import: ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE`` (its legacy name), else
``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``. Its layout::

    <cache>/models--Qwen--Qwen3-0.6B/
        refs/main                  the commit hash "main" points at
        snapshots/<hash>/          config.json, *.safetensors, tokenizer files, ...
        blobs/                     the files the snapshot links to
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from areal_agents.errors import ConfigError

# org/name or name: letters, digits, '-', '_', '.'; no '--' or '..' (the hub's own rules)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory the environment selects now (see module doc)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub model id (``"org/name"`` or ``"name"``).

    Example:
        >>> is_hub_id("Qwen/Qwen3-0.6B"), is_hub_id("/ckpt/qwen"), is_hub_id("runs/a/weights")
        (True, False, False)
    """
    return bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory of ``repo_id`` in the local HF cache (no network access).

    Args:
        repo_id: a hub model id, e.g. ``"Qwen/Qwen3-0.6B"``.
        revision: a branch, tag or commit hash (default ``"main"``).

    Raises:
        ConfigError: the id is not in the cache, or its snapshot has no ``config.json``; the
            message names the id, the cache path searched and the download command.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    searched = cache / ("models--" + repo_id.replace("/", "--"))
    fix = (f"download it first with `hf download {repo_id}` (or `huggingface-cli download "
           f"{repo_id}`), point HF_HUB_CACHE / HF_HOME at the cache that holds it, or pass a "
           "checkpoint directory; areal_agents never downloads models itself")
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        raise ConfigError(f"model {repo_id!r} is not a directory and not in the local Hugging "
                          f"Face cache (searched {str(searched)!r}): {fix}") from None
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {repo_id!r}: the cached snapshot {str(path)!r} has no "
                          f"config.json (an incomplete download?): {fix}")
    return path
