"""Runs the docstring examples of the built-in envs, the expression parser and the players."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "areal_agents.envs._expr",
    "areal_agents.envs.countdown",
    "areal_agents.envs.arithmetic",
    "areal_agents.envs.guess_number",
    "areal_agents.envs.signaling",
    "areal_agents.envs.tictactoe",
    "areal_agents.envs.prisoners_dilemma",
    "areal_agents.agents.players",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
