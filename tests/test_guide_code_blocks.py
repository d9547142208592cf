"""The guides' Python code blocks (``docs/*.md``) stay true to the code.

Every ```` ```python ```` block is compiled (top-level ``await`` allowed, as in a notebook) and
every ``areal_agents`` name it imports or reaches through ``aa.<name>`` must exist. Then each
guide's blocks run in order in one namespace (an earlier block's definitions serve the later
ones, ``aa`` is ``areal_agents`` from the start), in a temporary working directory, except a block right after a
``<!-- not run: <reason> -->`` line: a fragment with placeholders (``...``, ``path/to/...``),
a server launch or a long training run. The reason is required and shown in the test id.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"
_BLOCK = re.compile(r"(?:^|\n)(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", re.DOTALL)
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>\S.*?)\s*-->")


def _blocks(guide: Path) -> list[tuple[str, str | None]]:
    """``[(code, reason it is not run or None)]`` of ``guide``'s Python blocks, in order."""
    found = []
    for match in _BLOCK.finditer(guide.read_text()):
        marker = _NOT_RUN.search(match["before"])
        found.append((match["code"], marker["reason"] if marker else None))
    return found


GUIDES = sorted(g for g in DOCS.glob("*.md") if _blocks(g))


def _compile(code: str, where: str):
    return compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def _missing_names(code: str) -> list[str]:
    """``areal_agents`` names the block uses that do not exist."""
    import areal_agents as aa

    missing = []
    tree = ast.parse(code)
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
               for a in n.names if a.name == "areal_agents"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("areal_agents"):
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{a.name}" for a in node.names
                        if not hasattr(module, a.name)
                        and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in aliases and not hasattr(aa, node.attr)):
            missing.append(f"aa.{node.attr}")
    return missing


@pytest.mark.parametrize("guide", GUIDES, ids=lambda g: g.name)
def test_every_block_compiles_and_names_only_what_exists(guide: Path) -> None:
    for i, (code, _) in enumerate(_blocks(guide)):
        _compile(code, f"{guide.name} block {i}")
        assert not _missing_names(code), f"{guide.name} block {i} uses {_missing_names(code)}"


def _run_cases() -> list:
    cases = []
    for guide in GUIDES:
        reasons = [r for _, r in _blocks(guide)]
        marks = [pytest.mark.skip(reason="every block is marked not run")] if all(reasons) else []
        cases.append(pytest.param(guide, id=guide.name, marks=marks))
    return cases


@pytest.mark.parametrize("guide", _run_cases())
def test_guide_blocks_run_in_order(guide: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    import areal_agents as aa

    namespace: dict = {"__name__": f"__guide_{guide.stem}__", "aa": aa}  # the guides' alias
    for i, (code, reason) in enumerate(_blocks(guide)):
        if reason is not None:
            continue
        result = eval(_compile(code, f"{guide.name} block {i}"), namespace)
        if inspect.iscoroutine(result):
            asyncio.run(result)


def test_an_unmarked_broken_block_fails(tmp_path, monkeypatch) -> None:
    """The runner is not vacuous: a block that raises fails, a marked one is left out."""
    guide = tmp_path / "g.md"
    guide.write_text("<!-- not run: needs a GPU -->\n```python\nraise SystemExit\n```\n\n"
                     "text\n```python\nx = 1 / 0\n```\n")
    assert [r for _, r in _blocks(guide)] == ["needs a GPU", None]
    with pytest.raises(ZeroDivisionError):
        test_guide_blocks_run_in_order(guide, tmp_path, monkeypatch)
    assert _missing_names("import areal_agents as aa\naa.NoSuchThing()") == ["aa.NoSuchThing"]
