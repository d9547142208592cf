"""The documentation site builds with ``mkdocs build --strict`` (guides, the examples' READMEs
served in place, the API reference), and a broken link fails that build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")
pytest.importorskip("material")

ROOT = Path(__file__).resolve().parents[1]


def _nav_pages(node: object) -> list[str]:
    """The page paths of an mkdocs ``nav`` tree, in order."""
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    return [str(node)]


def test_the_nav_lists_every_guide_and_every_example_readme() -> None:
    nav = _nav_pages(yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)["nav"])
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    readmes = {p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").rglob("README.md")}
    assert not (pages | readmes) - set(nav), "add these to mkdocs.yml's nav"
    assert not set(nav) - pages - readmes, "mkdocs.yml's nav names missing pages"
    assert len(nav) == len(set(nav))


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "-d", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_the_site_builds_strict(tmp_path: Path) -> None:
    proc = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for name in ("Trainer", "DistributedEngineGroup", "Policy", "GRPO", "Gateway", "LLMAgent",
                 "LocalEngine", "TokenBatch", "write_view"):
        assert f'.{name}"' in api, name  # an anchor id="<module>.<name>"
    # docstrings' "Example:" sections render as highlighted doctest code, not as block quotes
    # (docs/reference/griffe_examples.py)
    assert 'class="gp">&gt;&gt;&gt;' in api and "<blockquote>\n<blockquote>" not in api
    assert (tmp_path / "site" / "examples" / "tictactoe" / "index.html").exists()  # README


@pytest.mark.slow
def test_a_broken_link_fails_the_strict_build(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    (docs / "debugging.md").write_text((docs / "debugging.md").read_text()
                                       + "\nSee [nothing](no_such_page.md).\n")
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    config["docs_dir"] = str(docs)
    config["hooks"] = [str(ROOT / "docs" / "reference" / "hooks.py")]
    config["plugins"] = ["search"]  # the reference page is not the point here
    config["nav"] = [n for n in config["nav"] if "API reference" not in n]
    (docs / "reference" / "api.md").write_text("# API reference\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    proc = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert "no_such_page.md" in proc.stderr
