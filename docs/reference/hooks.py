"""MkDocs hooks: serve ``examples/`` (READMEs, scripts, configs, notebooks) in the site in
place, without copying them into ``docs/``, and map repository-relative links onto the site.

On GitHub the guides link ``../examples/...`` and the example READMEs ``../../docs/...``; in
the site ``docs/`` is the root and ``examples/`` is mounted under it, so those prefixes are
rewritten. Any other broken link still fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {".md", ".py", ".yaml", ".yml", ".ipynb", ".json", ".sh", ".png"}


def on_files(files: Files, config: Any) -> Files:
    """Add every example source file as ``examples/...`` of the site."""
    for path in sorted((ROOT / "examples").rglob("*")):
        if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
            rel = path.relative_to(ROOT).as_posix()
            files.append(File(rel, src_dir=str(ROOT), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrite repository-relative links to their place in the site."""
    src = page.file.src_uri
    if src.startswith("examples/"):
        here = (ROOT / src).parent  # GitHub shows a folder's README for "folder/": so does the site
        markdown = re.sub(r"\]\(([\w./-]+)/\)", lambda m: f"]({m[1]}/README.md)"
                          if (here / m[1] / "README.md").is_file() else m[0], markdown)
        depth = src.count("/")  # examples/x/README.md -> 2
        up = "../" * depth
        markdown = markdown.replace(f"]({up}docs/", f"]({up}")
        return re.sub(rf"\]\({re.escape(up)}README\.md(#[^)]*)?\)", rf"]({up}index.md\1)",
                      markdown)
    up = "../" * (src.count("/") + 1)
    markdown = markdown.replace(f"]({up}examples/", f"]({up[3:]}examples/")
    return re.sub(rf"\]\({re.escape(up)}README\.md(#[^)]*)?\)", rf"]({up[3:]}index.md\1)",
                  markdown)
