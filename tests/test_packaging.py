"""Packaging: every package folder is listed, base dependencies cover module-level imports,
the licence and ``py.typed`` ship, and a missing optional extra costs one clear line."""

from __future__ import annotations

import ast
import logging
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from areal_agents import cli
from areal_agents.extras import missing_message, require
from areal_agents.metrics import JSONLLogger, MultiLogger, make_logger

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR = PYPROJECT["tool"]["setuptools"]["package-dir"]  # areal_agents.envs -> envs ...
# Module-level imports of optional extras, allowed only under these folders.
OPTIONAL_IMPORTS = {"megatron": "trainers/megatron/"}  # the [megatron] extra


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r)[0].lower().replace("_", "-") for r in requirements}


def _source_files() -> list[Path]:
    return sorted(p for d in set(PACKAGE_DIR.values()) for p in (ROOT / d).rglob("*.py"))


def test_every_package_folder_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in PACKAGE_DIR.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert sorted(found - listed) == []


def _parse(source: str) -> ast.Module:
    """``ast.parse``, retried once on CPython 3.11's "AST constructor recursion depth mismatch":
    its AST converter keeps one recursion counter per interpreter, which a thread left running by
    an earlier test (Ray, a server) can move mid-parse (seen once in CI)."""
    try:
        return ast.parse(source)
    except SystemError:
        return ast.parse(source)


def test_base_dependencies_cover_module_level_imports():
    base = _requirement_names(PYPROJECT["project"]["dependencies"])
    dists = packages_distributions()
    missing = []
    for path in _source_files():
        rel = path.relative_to(ROOT).as_posix()
        for node in _parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top == "areal_agents":
                    continue
                if rel.startswith(OPTIONAL_IMPORTS.get(top, "\0")):
                    continue
                names = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                if not names & base:
                    missing.append(f"{rel}: {top}")
    assert missing == []


def test_starlette_is_declared_and_fastapi_is_not():
    base = _requirement_names(PYPROJECT["project"]["dependencies"])
    assert "starlette" in base and "fastapi" not in base


def test_license_and_py_typed_ship():
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
    assert (ROOT / "areal_agents" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["areal_agents"]


def test_extras_used_in_messages_are_declared():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, extra in (("matplotlib", "plot"), ("tensorboard", "tensorboard"),
                          ("peft", "lora")):
        assert module in _requirement_names(extras[extra])


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.raises(ModuleNotFoundError) as info:
        require("matplotlib", "plot", "areal-agents plot")
    assert str(info.value) == ('areal-agents plot needs matplotlib, which is not installed: '
                               'pip install "areal-agents[plot]"')
    assert info.value.name == "matplotlib"
    assert require("json", "none", "x").__name__ == "json"


def _metrics(run_dir: Path) -> None:
    logger = JSONLLogger(run_dir / "metrics.jsonl")
    logger.log(1, {"train/a/reward": 0.5})
    logger.close()


def test_plot_without_matplotlib_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    _metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "error: " + missing_message("matplotlib", "plot", "areal-agents plot") + "\n"


def test_train_without_matplotlib_trains_and_exits_0(tmp_path, monkeypatch, capsys):
    from areal_agents.config import RunConfig

    class FakeTrainer:
        async def afit(self, steps):
            _metrics(tmp_path)
            return [{"train/a/reward": 0.5}] * steps

        async def aclose(self):
            pass

    monkeypatch.setattr(RunConfig, "build", lambda self, resume=False: FakeTrainer())
    config = tmp_path / "c.yaml"
    config.write_text(f"env: Signaling-v0\npolicies: {{a: {{}}}}\npolicy_map: {{speaker: a}}\n"
                      f"run_dir: {tmp_path}\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["train", str(config), "trainer.steps=2"]) == 0
    out = capsys.readouterr().out
    assert f"plot: skipped ({missing_message('matplotlib', 'plot', 'areal-agents plot')})" in out


def test_missing_tensorboard_is_one_warning_line_and_jsonl_goes_on(tmp_path, monkeypatch,
                                                                    caplog):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with caplog.at_level(logging.WARNING, logger="areal_agents.metrics"):
        logger = make_logger(tmp_path, tensorboard=True)
    logger.log(1, {"x": 1.0})
    logger.close()
    assert isinstance(logger, MultiLogger) and len(logger.loggers) == 1
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        'TensorBoard logging (logging.tensorboard) needs tensorboard, which is not installed: '
        'pip install "areal-agents[tensorboard]"; or set logging.tensorboard: false. Metrics '
        f'still go to {tmp_path / "metrics.jsonl"}']


def test_missing_peft_names_the_lora_extra(monkeypatch):
    from areal_agents.models import tiny
    from areal_agents.trainers.fsdp.engine import FSDPEngine

    model, _ = tiny("xs", seed=0)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ModuleNotFoundError, match=re.escape(
            'LoRA on the FSDP backend (Policy.lora) needs peft, which is not installed: '
            'pip install "areal-agents[lora]"')):
        FSDPEngine(model, lr=1e-3, lora={"r": 4})


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme if line.startswith("python -m venv .venv ")
                and line.endswith("&& pytest -q")]
    assert len(commands) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert any(line.startswith(commands[0] + " ||") for line in ci)
    assert "set -euo pipefail" in ci and "ruff check . || failed+=(\"ruff\")" in ci
