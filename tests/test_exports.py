"""Pins the flat API: every ``_EXPORTS`` name resolves, and pyproject lists every package."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

import areal_agents as aa

ROOT = Path(__file__).resolve().parents[1]
# import package -> source folder (pyproject's package-dir mapping)
FOLDERS = {
    "areal_agents.envs": "envs",
    "areal_agents.agents": "agents",
    "areal_agents.trainers": "trainers",
}


def module_path(module: str) -> Path | None:
    """The source file of ``module`` inside this checkout, or None if it does not exist."""
    for prefix, folder in sorted(FOLDERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            parts = (
                [folder, *module[len(prefix) + 1 :].split(".")] if module != prefix else [folder]
            )
            break
    else:
        parts = module.split(".")
    base = ROOT.joinpath(*[p for p in parts if p])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _missing_module(exc: ModuleNotFoundError) -> bool:
    """True when the import failed because one of *our* modules is not written yet."""
    return bool(exc.name and exc.name.startswith("areal_agents") and module_path(exc.name) is None)


@pytest.mark.parametrize("name", sorted(aa._EXPORTS))
def test_export_resolves(name):
    module = aa._EXPORTS[name]
    if module_path(module) is None:
        pytest.skip(f"{module} is not written yet")
    try:
        value = getattr(aa, name)
    except ModuleNotFoundError as exc:
        if _missing_module(exc):
            pytest.skip(f"{name}: {exc.name} is not written yet")
        raise
    assert value is getattr(importlib.import_module(module), name)


def test_all_is_sorted_exports_and_submodules():
    assert aa.__all__ == sorted(aa._EXPORTS) + sorted(aa._SUBMODULES)
    assert set(dir(aa)) >= set(aa.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = aa.nope


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in (
        ("areal_agents", "areal_agents"),
        ("envs", "areal_agents.envs"),
        ("agents", "areal_agents.agents"),
        ("trainers", "areal_agents.trainers"),
    ):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join([package, *rel]))
    missing = sorted(found - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_agents_package_imports_without_llm_module():
    agents = importlib.import_module("areal_agents.agents")
    assert {"RandomAgent", "ScriptedAgent", "HumanAgent"} <= set(agents.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = agents.Nope
