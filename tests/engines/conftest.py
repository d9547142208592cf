"""Fixtures shared by the engine-server tests (``test_remote*.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from areal_agents.models import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ``xs`` model and its tokenizer saved as a checkpoint directory."""
    model, tok = tiny("xs", seed=0)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for a module's long-lived engine server and its calls."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
