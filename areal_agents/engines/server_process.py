"""``ServerProcess``: an inference-server subprocess that never outlives its owner.

The server runs in its own process group (it may start workers of its own), writes stdout and
stderr to a log file, and is stopped as a group: SIGTERM, then SIGKILL after a grace period.
Stopping happens on ``stop()``, when the object is garbage-collected, at interpreter exit
(Ctrl-C included, through ``weakref.finalize``), and -- on Linux -- when the owning thread dies
without cleaning up (``PR_SET_PDEATHSIG``), so a crashed trainer leaves no orphan server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import httpx2

from ..errors import EngineError, EngineTimeout

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent thread dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM ``proc``'s process group, wait ``grace_s``, then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    # workers of the server may outlive it: kill the whole group in any case
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


class ServerProcess:
    """A started server subprocess (its own process group; output in ``log_path``).

    Args:
        argv: the command line.
        log_path: file receiving the server's stdout and stderr (created or truncated).
        env: extra environment variables (added to ``os.environ``).
        name: how messages name the server ("vLLM server").
        grace_s: seconds between SIGTERM and SIGKILL on ``stop``.

    Raises:
        EngineError: the command cannot be started (e.g. the interpreter does not exist).
    """

    def __init__(self, argv: Sequence[str], log_path: str | Path, *,
                 env: Mapping[str, str] | None = None, name: str = "server",
                 grace_s: float = 15.0) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.name = name
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                    start_new_session=True, preexec_fn=_die_with_parent())
            except OSError as exc:
                raise EngineError(f"cannot start the {name} ({self.argv[0]}): {exc}") from exc
        self._finalizer = weakref.finalize(self, _stop_group, self.proc, grace_s)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        """Whether the server process has not exited."""
        return self.proc.poll() is None

    def log_tail(self, num_lines: int = 30) -> str:
        """The last ``num_lines`` lines of the server's log ("" when there is none)."""
        try:
            data = self.log_path.read_bytes()[-64_000:]
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-num_lines:])

    def stop(self) -> None:
        """Stop the server and its workers (SIGTERM, then SIGKILL). Idempotent."""
        self._finalizer()

    async def wait_ready(self, url: str, *, timeout_s: float,
                         progress: Callable[[str], None] | None = None) -> None:
        """``wait_healthy`` with a probe client of its own and progress on stderr by default;
        the server is stopped when it fails (or is cancelled) before it is ready.

        Raises:
            EngineError, EngineTimeout: as ``wait_healthy``.
        """
        try:
            async with httpx2.AsyncClient() as probe:
                await self.wait_healthy(
                    probe, url, timeout_s=timeout_s,
                    progress=progress or partial(print, file=sys.stderr, flush=True))
        except BaseException:
            self.stop()
            raise

    async def wait_healthy(self, http: httpx2.AsyncClient, url: str, *, timeout_s: float,
                           progress: Callable[[str], None] | None = None,
                           progress_every_s: float = 15.0, poll_s: float = 0.5) -> None:
        """Poll ``GET url`` until it answers 200.

        Reports progress (elapsed time and the log's last line) every ``progress_every_s``
        through ``progress`` (default: the module logger at INFO).

        Raises:
            EngineError: the server exited first (the message holds its last log lines).
            EngineTimeout: no 200 within ``timeout_s`` (with the log tail); the server is
                stopped.
        """
        report = progress or log.info
        start = last_report = time.monotonic()
        while True:
            if not self.running:
                raise EngineError(
                    f"the {self.name} exited with code {self.proc.returncode} before it was "
                    f"ready; its last log lines ({self.log_path}):\n{self.log_tail()}")
            with contextlib.suppress(httpx2.TransportError):
                if (await http.get(url, timeout=5.0)).status_code == 200:
                    return
            now = time.monotonic()
            if now - start > timeout_s:
                self.stop()
                raise EngineTimeout(
                    f"the {self.name} was not ready after {timeout_s:.0f} s (GET {url}); raise "
                    f"the start-up timeout on a busy machine. Its last log lines "
                    f"({self.log_path}):\n{self.log_tail()}")
            if now - last_report >= progress_every_s:
                last_report = now
                tail = self.log_tail(1)
                report(f"waiting for the {self.name} ({now - start:.0f} s): {tail[-160:]}")
            await asyncio.sleep(poll_s)
