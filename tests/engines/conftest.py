"""Fixtures shared by the engine-server tests (``test_remote*.py``); ``model_dir`` is in
``tests/conftest.py``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for a module's long-lived engine server and its calls."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
