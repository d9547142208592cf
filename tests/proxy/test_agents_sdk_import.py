"""The Agents SDK example imports OpenAI's ``agents`` package even with the repository root on
``sys.path`` (``python -m`` / ``PYTHONPATH=.`` from the root, pytest's rootdir), where the
repository's own ``agents/`` folder shadowed it (``ImportError: cannot import name 'Agent'``)."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _sdk_installed() -> bool:
    try:
        importlib.metadata.version("openai-agents")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _sdk_installed(), reason="needs openai-agents (the agents_sdk extra)")
def test_the_sdk_is_found_past_the_repositorys_agents_folder(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples/proxy"))
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.delitem(sys.modules, "agents", raising=False)
    shadow = importlib.import_module("agents")
    assert Path(shadow.__file__).parent == ROOT / "agents" and not hasattr(shadow, "Runner")
    path = list(sys.path)
    from proxy_driver import agents_sdk

    sdk = agents_sdk()
    assert hasattr(sdk, "Runner") and Path(sdk.__file__).parent != ROOT / "agents"
    assert sys.modules["agents"] is sdk and sys.path == path  # the path is restored
    assert agents_sdk() is sdk
