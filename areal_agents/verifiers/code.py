"""``code``: run the response's program against the task's unit tests in the sandbox.

The reference answer is the tests, in one of three forms:

* a list of strings, each one test (``["assert add(2, 3) == 5", ...]``);
* a string defining ``test_*`` functions (pytest style, no fixtures): the string runs once
  after the solution, then each ``test_*`` function is one test, in definition order;
* any other string: each top-level ``assert`` is one test; its other statements run in
  place as setup (a failing setup statement fails every test after it).

The solution is the last fenced code block marked ``python``/``py`` in the response, else the
last fenced block, else the whole response. It runs as module ``solution`` (an
``if __name__ == "__main__":`` block does not run), the tests in its namespace, all in one
sandboxed process (``areal_agents.sandbox``: no network, time/memory/process limits). A test
passes when it raises nothing. Results travel on stdout tagged with a per-call nonce read
from stdin before the solution runs; a solution that inspects the harness' frames could still
forge them (reward hacking by introspection is not prevented).
"""

from __future__ import annotations

import ast
import functools
import json
import re
import secrets
from collections.abc import Sequence
from typing import Any, Literal

from areal_agents.sandbox import Sandbox, SandboxResult

from .base import Verdict, shorten

__all__ = ["CodeVerifier", "extract_code", "split_tests"]

_FENCE = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_HARNESS = r'''
import json, sys
nonce = sys.stdin.readline().strip()
tests = json.load(open("tests.json"))
out = sys.stdout
def report(*fields):
    out.write(nonce + " " + json.dumps(fields) + "\n"); out.flush()
ns = {"__name__": "solution"}
try:
    exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
except SyntaxError as exc:
    report("syntax", f"line {exc.lineno}: {exc.msg}"); sys.exit(0)
except BaseException as exc:
    report("solution", f"{type(exc).__name__}: {exc}"); sys.exit(0)
if tests["kind"] == "functions":
    exec(compile(tests["source"], "tests.py", "exec"), ns)
    tests["items"] = [f"{name}()" for name in tests["names"]]
for i, item in enumerate(tests["items"]):
    try:
        exec(compile(item, f"test_{i + 1}", "exec"), ns)
        report("test", i, None)
    except BaseException as exc:
        report("test", i, f"{type(exc).__name__}: {exc}".rstrip(": "))
'''


@functools.cache
def _shared_sandbox(timeout: float, memory_bytes: int) -> Sandbox:
    return Sandbox(timeout, memory_bytes=memory_bytes)


def extract_code(response: str) -> str:
    """The program in ``response``: its last ``python``/``py`` fenced block, else its last
    fenced block, else the whole text.

    Example:
        >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nDone.")
        'print(1)\\n'
    """
    blocks = _FENCE.findall(response)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python or blocks:
        return (python or [body for _, body in blocks])[-1]
    return response


def split_tests(answer: Any) -> dict[str, Any]:
    """The tests of a reference answer (forms in the module docstring) as the harness takes
    them: ``{"kind": "items", "items": [...]}`` or ``{"kind": "functions", ...}``.

    Raises:
        ValueError: an answer that is neither a string nor a list of strings, has no tests,
            or does not parse (the dataset row is unusable).
    """
    if isinstance(answer, Sequence) and not isinstance(answer, str):
        items = [str(a) for a in answer]
        if not items:
            raise ValueError("the code verifier's answer (the unit tests) is an empty list")
        return {"kind": "items", "items": items}
    if not isinstance(answer, str):
        raise ValueError(f"the code verifier's answer must be test source or a list of asserts, "
                         f"got {type(answer).__name__}")
    try:
        tree = ast.parse(answer)
    except SyntaxError as exc:
        raise ValueError(f"the unit tests do not parse: line {exc.lineno}: {exc.msg}") from None
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)
             and n.name.startswith("test")]
    if names:
        return {"kind": "functions", "source": answer, "names": names}
    items, setup = [], []
    for node in tree.body:
        source = ast.get_source_segment(answer, node) or ""
        if isinstance(node, ast.Assert):
            items.append("\n".join([*setup, source]))
            setup = []
        else:
            setup.append(source)
    if not items:
        raise ValueError("the unit tests contain no assert and no test_* function")
    return {"kind": "items", "items": items}


class CodeVerifier:
    """Score a program by the unit tests it passes, run in a ``Sandbox``.

    Args:
        scoring: ``"fraction"`` (passed / total) or ``"all"`` (1 only when every test
            passes).
        timeout: wall seconds for the whole run (solution and tests).
        memory_bytes: the sandbox's address-space limit.
        reveal_tests: name the first failing test by its source in the reason (the tests
            state the expected values, so by default only its number and error).

    A wrong verdict's reason names the syntax error, the solution's own exception, the first
    failing test or the timeout. ``verify`` blocks; envs await ``averify``.

    Example:
        >>> verifier = CodeVerifier(timeout=20.0)
        >>> verifier.verify("```python\\ndef add(a, b):\\n    return a - b\\n```",
        ...                 ["assert add(2, 2) == 4", "assert add(0, 0) == 0"])
        Verdict(score=0.5, reason='1 of 2 tests passed; test 1 failed: AssertionError')
    """

    def __init__(self, scoring: Literal["fraction", "all"] = "fraction", timeout: float = 10.0,
                 memory_bytes: int = 1 << 30, reveal_tests: bool = False) -> None:
        if scoring not in ("fraction", "all"):
            raise ValueError(f"scoring must be 'fraction' or 'all', got {scoring!r}")
        self.scoring, self.timeout, self.memory_bytes = scoring, timeout, memory_bytes
        self.reveal_tests = reveal_tests
        self._sandbox: Sandbox | None = None

    def __getstate__(self) -> dict[str, Any]:  # picklable: the sandbox is rebuilt on use
        return {**self.__dict__, "_sandbox": None}

    @property
    def sandbox(self) -> Sandbox:
        """The sandbox: one per ``(timeout, memory_bytes)`` in this process, shared by every
        ``CodeVerifier`` with those options (so its concurrency limit holds for all envs)."""
        if self._sandbox is None:
            self._sandbox = _shared_sandbox(self.timeout, self.memory_bytes)
        return self._sandbox

    def verify(self, response: str, answer: Any) -> Verdict:
        """Score ``response`` against the unit tests ``answer`` (blocking)."""
        tests, nonce, files = self._prepare(response, answer)
        return self._score(self.sandbox.run_sync(_HARNESS, stdin=nonce, files=files), tests,
                           nonce)

    async def averify(self, response: str, answer: Any) -> Verdict:
        """``verify`` for async callers (the run happens in the sandbox's worker threads)."""
        tests, nonce, files = self._prepare(response, answer)
        return self._score(await self.sandbox.run(_HARNESS, stdin=nonce, files=files), tests,
                           nonce)

    def _prepare(self, response: str, answer: Any) -> tuple[dict[str, Any], str, dict[str, str]]:
        tests = split_tests(answer)
        files = {"solution.py": extract_code(response), "tests.json": json.dumps(tests)}
        return tests, secrets.token_hex(16), files

    def _score(self, result: SandboxResult, tests: dict[str, Any], nonce: str) -> Verdict:
        """The verdict from the harness' tagged lines (tests without a line did not run)."""
        names = tests["names"] if tests["kind"] == "functions" else [
            f"test {i + 1}" for i in range(len(tests["items"]))]
        errors: dict[int, str | None] = {}
        for line in result.stdout.splitlines():
            tag, _, payload = line.partition(" ")
            if tag != nonce:
                continue
            kind, *fields = json.loads(payload)
            if kind == "syntax":
                return Verdict(0.0, f"syntax error in the solution: {shorten(fields[0], 80)}")
            if kind == "solution":
                return Verdict(0.0, f"the solution raised {shorten(fields[0], 80)}")
            errors[fields[0]] = fields[1]
        passed = sum(1 for e in errors.values() if e is None)
        total = len(names)
        score = passed / total if self.scoring == "fraction" else float(passed == total)
        failed = [i for i in range(total) if errors.get(i, "") is not None]
        if not failed:
            return Verdict(score, f"all {total} tests passed")
        first = failed[0]
        name = names[first]
        if self.reveal_tests and tests["kind"] == "items":
            name += f" ({shorten(tests['items'][first], 60)})"
        if first in errors:
            what = f"failed: {shorten(str(errors[first]), 80)}"
        elif result.killed_by or result.setup_error or result.memory_exceeded:
            what = f"did not finish: {result.summary()}"
        else:
            what = f"did not run: the program stopped before it ({result.summary()})"
        return Verdict(score, f"{passed} of {total} tests passed; {name} {what}")
