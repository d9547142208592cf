"""Fixtures shared across test packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from areal_agents.models import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ``xs`` model and its tokenizer saved as a checkpoint directory (the engine
    server and Ray replica tests launch servers from it)."""
    model, tok = tiny("xs", seed=0)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
