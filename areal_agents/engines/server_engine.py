"""``ServerEngine``: what ``VLLMEngine`` and ``SGLangEngine`` share beyond ``HTTPEngine``.

Both drive a third-party inference server started from its own venv, and own, once here:

* ``_launch_server``: the interpreter (``python=`` or ``$<python_env>``; neither is a
  ``ConfigError`` naming both), ``python -m <server_module> ... --host 127.0.0.1 --port P`` as
  a ``ServerProcess``, waited for until ``GET /health`` answers; ``_attach_or_stop`` stops
  that server if attaching to it fails, so a failed launch leaves no process behind;
* ``_paused_for_update``: a weight update pauses the server unless it is paused already and
  resumes, on the way out (failure or not), only what it paused itself; the caller holds
  ``_update_lock``, so concurrent updates take distinct versions;
* the directory weights are written to (``_weights_dir``), removed by ``close`` when the
  engine made it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

import httpx2

from ..errors import ConfigError
from .http_engine import HTTPEngine
from .server_process import ServerProcess, free_port

E = TypeVar("E")


class ServerEngine(HTTPEngine):
    """An ``HTTPEngine`` for a server this project launches from another venv and updates.

    Subclasses set ``server_name`` (how messages name it), ``python_env`` (the variable naming
    the venv's interpreter), ``server_package`` (what that venv must hold) and
    ``server_module`` (what ``python -m`` runs), and implement ``pause`` / ``resume``.

    Args:
        weights_dir: where weight files are written (None: a temporary directory made on first
            use and removed by ``close``; a given one is kept).
        Others: as ``HTTPEngine``.
    """

    python_env: ClassVar[str]
    server_package: ClassVar[str]
    server_module: ClassVar[str]

    def __init__(self, url: str, *, timeout_s: float = 600.0, server: ServerProcess | None = None,
                 transport: httpx2.AsyncBaseTransport | None = None,
                 weights_dir: str | Path | None = None) -> None:
        super().__init__(url, timeout_s=timeout_s, server=server, transport=transport)
        self._own_weights_dir = weights_dir is None
        self._weights_dir = Path(weights_dir) if weights_dir else None
        self._paused = False
        self._update_lock = asyncio.Lock()

    async def pause(self) -> None:  # pragma: no cover - every subclass implements it
        raise NotImplementedError

    async def resume(self) -> None:  # pragma: no cover - every subclass implements it
        raise NotImplementedError

    # -- launching ----------------------------------------------------------------------------

    @classmethod
    async def _launch_server(cls, args: Sequence[str], *, python: str | None, port: int | None,
                             env: dict[str, str], log_path: str | Path | None,
                             startup_timeout_s: float,
                             progress: Callable[[str], None] | None) -> tuple[ServerProcess, str]:
        """Start ``python -m server_module *args`` on ``127.0.0.1:port`` (a free port if None)
        with ``env`` added, its output in ``log_path`` (a new temporary file if None); wait
        until ``/health`` answers. Returns the server and its base URL.

        Raises:
            ConfigError: no ``python`` and no ``$<python_env>``.
            EngineError: the server exited during start-up (with its last log lines).
            EngineTimeout: not healthy within ``startup_timeout_s`` (the server is stopped).
        """
        python = python or os.environ.get(cls.python_env)
        if not python:
            raise ConfigError(f"{cls.__name__}.launch needs python= (a venv's interpreter with "
                              f"{cls.server_package}) or ${cls.python_env}; see "
                              "docs/inference_servers.md")
        port = port or free_port()
        argv = [python, "-m", cls.server_module, *args, "--host", "127.0.0.1", "--port", str(port)]
        log_path = log_path or Path(tempfile.mkdtemp(
            prefix=f"{cls.server_package.lower()}-")) / "server.log"
        server = ServerProcess(argv, log_path, env=env, name=cls.server_name)
        url = f"http://127.0.0.1:{port}"
        await server.wait_ready(f"{url}/health", timeout_s=startup_timeout_s, progress=progress)
        return server, url

    @staticmethod
    async def _attach_or_stop(server: ServerProcess, attach: Awaitable[E]) -> E:
        """``await attach``; if it fails (or is cancelled), stop ``server`` and re-raise."""
        try:
            return await attach
        except BaseException:
            server.stop()
            raise

    # -- weight updates -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _paused_for_update(self) -> AsyncIterator[None]:
        """Pause unless already paused; on exit resume if paused here (failure or not). Hold
        ``_update_lock`` around it."""
        paused_here = not self._paused
        if paused_here:
            await self.pause()
        try:
            yield
        finally:
            if paused_here:
                await self.resume()

    def _new_folder(self, name: str) -> Path:
        """``name`` inside this engine's weights directory (made on first use)."""
        if self._weights_dir is None:
            self._weights_dir = Path(tempfile.mkdtemp(
                prefix=f"{self.server_package.lower()}-weights-"))
        return self._weights_dir / name

    async def _release(self) -> None:
        """Remove this engine's own weights directory (``close`` stops client and server
        first); a ``weights_dir`` given to the constructor is kept."""
        if self._own_weights_dir and self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
