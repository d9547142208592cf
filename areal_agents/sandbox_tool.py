"""``python_tool``: a local tool for ``LLMAgent`` that runs model-written Python in a sandbox.

Example:
    >>> import asyncio
    >>> from areal_agents.sandbox import Sandbox
    >>> box = Sandbox(timeout=20.0)
    >>> print(asyncio.run(python_tool(box)("print(sum(range(10)))")))
    45
    >>> box.close()
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from areal_agents.sandbox import Sandbox, SandboxResult

__all__ = ["format_result", "python_tool"]


def format_result(result: SandboxResult) -> str:
    """The tool text of a run: stdout, then stderr, then the outcome unless it exited 0."""
    parts = [result.stdout.rstrip("\n")] if result.stdout else []
    if result.stderr:
        parts.append(result.stderr.rstrip("\n"))
    if not result.ok:
        parts.append(f"[{result.summary()}]")
    return "\n".join(parts)


def python_tool(sandbox: Sandbox, *, timeout: float | None = None
                ) -> Callable[[str], Awaitable[str]]:
    """An async tool ``python(code)`` for ``LLMAgent(tool_fns={"python": ...})``.

    Each call runs ``code`` in ``sandbox`` (a fresh work directory, no network, the sandbox's
    limits; ``timeout`` overrides its wall timeout) and returns ``format_result``. Being
    async, the agent's ``tool_timeout`` cancels it, which kills the run.
    """

    async def python(code: str) -> str:
        """Run a Python program in a sandbox (no network) and return its output."""
        return format_result(await sandbox.run(code, timeout=timeout))

    return python
