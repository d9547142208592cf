"""Every docstring example of every ``areal_agents`` module runs (``Example:`` sections are
part of the contract, STYLE.md 11), including the mapped ``envs/``, ``agents/`` and
``trainers/`` packages. Modules that need an optional extra that is not installed are skipped,
with the reason."""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import areal_agents

ROOTS = ("areal_agents", "areal_agents.envs", "areal_agents.agents", "areal_agents.trainers")
OPTIONAL = {"megatron": "megatron-core (the [megatron] extra)",
            "vllm": "vllm", "sglang": "sglang", "ray": "ray", "wandb": "wandb"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    names: set[str] = set()
    for root in ROOTS:
        package = importlib.import_module(root)
        names.add(root)
        # onerror: a subpackage whose import fails is still listed, and skipped or failed below
        names.update(info.name for info in pkgutil.walk_packages(
            package.__path__, root + ".", onerror=names.add))
    return sorted(names)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top in OPTIONAL:
            pytest.skip(f"{name} needs {OPTIONAL[top]}, not installed here")
        raise


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples_run(name):
    module = _import(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out = io.StringIO()
    for test in doctest.DocTestFinder().find(module, name, extraglobs={"aa": areal_agents}):
        runner.run(test, out=out.write)
    assert runner.failures == 0, out.getvalue()
