"""The README's tour is ``examples/tour.py`` verbatim, and the script runs (tiny size)."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "tour.py"


def readme_tour() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## A tour\n.*?^```python\n(.*?)^```\n", readme, re.S | re.M)
    assert match is not None, "README.md lost its '## A tour' python block"
    return match[1]


def test_readme_tour_is_the_script_body():
    script = SCRIPT.read_text()
    body = script[script.index("import areal_agents as aa\n"):script.index("\nif __name__")]
    assert readme_tour().strip() == body.strip()


def test_readme_tour_has_no_placeholders():
    tour = readme_tour()
    assert "..." not in tour.replace('"...",', "")  # no `RandomAgent(...)` placeholders
    assert not re.search(r"^await ", tour, re.M)  # no top-level await: it runs as a script


@pytest.mark.slow
def test_tour_script_runs(tmp_path, monkeypatch, capfd):
    """``python examples/tour.py --steps 1 --batch-size 8``, its ``__main__`` block included,
    run in this process (runpy) to save an interpreter start and a torch import."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--steps", "1", "--batch-size", "8"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out, err = capfd.readouterr()
    assert "TicTacToe returns: {'x': 1.0, 'o': -1.0}" in out  # first free cell beats random
    assert "check_env: PASS" in out
    assert 'Countdown observation: [{"role": "user", "content": "Numbers:' in out
    assert re.search(r"recorded: \d+ tokens, [1-8] generated", out)  # max_tokens 8
    assert re.search(r"step 1: success speaker \d\.\d\d, listener \d\.\d\d", out)
    assert "✓ building the archon train engine of listener" in err
