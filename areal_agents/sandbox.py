"""``Sandbox``: run untrusted code (Python source or an argv) in a limited subprocess per call.

Each call gets a fresh temporary work directory (the cwd, ``HOME`` and ``TMPDIR``; removed
afterwards) and a new process group, and runs under these limits:

====================  =====================================================================
wall time             ``timeout``: then the whole process group is killed (``killed_by``
                      ``"wall_timeout"``); so is any group member left when the main
                      process exits.
CPU time              ``RLIMIT_CPU`` = ``cpu_seconds`` (``"cpu_limit"``).
memory                ``RLIMIT_AS`` = ``memory_bytes`` (Python raises ``MemoryError``:
                      ``memory_exceeded``).
processes             ``RLIMIT_NPROC`` = ``max_processes`` (a fork bomb gets ``EAGAIN``).
file size             ``RLIMIT_FSIZE`` = ``max_file_bytes`` per file written.
output                ``max_output_bytes`` per stream; more is cut (``truncated``) and the
                      process group killed (``"output_limit"``).
network               an unshared network namespace (``network_isolation == "netns"``):
                      no interface but a down loopback, so every connect fails; where
                      namespaces are unavailable, Python source runs with ``socket``
                      disabled (``"python-guard"``, bypassable: ``ctypes``, a subprocess),
                      and an argv gets no guard (``"none"``).
====================  =====================================================================

Where namespaces work (``isolation()``), the sandbox also gets its own mount namespace with an
empty private tmpfs on ``/tmp``, ``/var/tmp`` and ``/dev/shm`` (the work directory bound back
in), so files written there vanish with the call. As root the code runs as an unprivileged
uid, one per concurrent slot (``Sandbox.slot_uids``): file permissions then stop writes outside
the work directory and the private tmpfs, ``RLIMIT_NPROC`` (which root ignores) is
effective, and leftovers of that uid (a process that left the group with ``setsid``) are
killed after each call. Caveats, not prevented: as a non-root user the code runs as that user
and can write wherever the user can, ``RLIMIT_NPROC`` counts *all* of the user's processes
(set ``max_processes`` above what the user already runs), and a process that calls ``setsid``
escapes the group kill. Reading the file system is not restricted.

Example:
    >>> sandbox = Sandbox(timeout=20.0)
    >>> result = sandbox.run_sync("print(6 * 7)")
    >>> result.returncode, result.stdout
    (0, '42\\n')
    >>> sandbox.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import json
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from areal_agents import _sandbox_boot
from areal_agents.errors import ConfigError

__all__ = ["Sandbox", "SandboxResult", "isolation"]

NetworkIsolation = Literal["netns", "python-guard", "none"]
_slot_counter = itertools.count()  # slot uids handed out in this process (mod 256)
_BOOT = str(Path(_sandbox_boot.__file__).resolve())
_HIDE = ["/tmp", "/var/tmp", "/dev/shm"]
_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
_GUARD = """\
import socket as _s, sys as _sys
def _deny(*a, **k):
    raise PermissionError("network access is disabled in this sandbox")
for _m in (_s, _sys.modules.get("_socket")):
    for _n in ("socket", "create_connection", "getaddrinfo", "socketpair", "fromfd"):
        if _m is not None and hasattr(_m, _n):
            setattr(_m, _n, _deny)
del _s, _sys, _m, _n, _deny
import runpy
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did; never an exception for anything the code did.

    Attributes:
        returncode: exit status (negative: killed by that signal; ``None``: never started).
        stdout: standard output (UTF-8, undecodable bytes replaced), capped.
        stderr: standard error, capped (a failed sandbox setup explains itself here).
        timed_out: the wall timeout expired.
        killed_by: why the sandbox ended it, if it did: ``"wall_timeout"``, ``"cpu_limit"``,
            ``"output_limit"``, ``"cancelled"``, or a signal name (``"SIGSEGV"``...).
        cpu_seconds: user + system CPU time of the process and its reaped children.
        wall_seconds: from start to the last process gone.
        truncated: an output stream hit ``max_output_bytes`` (the text says so at its end).
        memory_exceeded: the code ran out of memory (``MemoryError`` or the like on stderr).
        network_isolation: how the network was cut off (module docstring).
        setup_error: the sandbox could not be set up (the code did not run).
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    killed_by: str | None = None
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    truncated: bool = False
    memory_exceeded: bool = False
    network_isolation: NetworkIsolation = "none"
    setup_error: str | None = None

    @property
    def ok(self) -> bool:
        """Exit status 0 and no limit hit."""
        return self.returncode == 0 and self.killed_by is None and not self.truncated

    def summary(self) -> str:
        """One line naming the outcome (for verifier reasons and tool results)."""
        if self.setup_error:
            return f"sandbox setup failed: {self.setup_error}"
        if self.killed_by == "wall_timeout":
            return f"timed out after {self.wall_seconds:.1f}s (wall)"
        if self.killed_by:
            return f"killed by {self.killed_by}"
        if self.memory_exceeded:
            return "ran out of memory"
        return f"exit status {self.returncode}"


@functools.cache
def isolation(python: str = sys.executable) -> NetworkIsolation:
    """``"netns"`` when this process can give a child network + mount namespaces, else
    ``"python-guard"`` (probed once per interpreter by running the boot helper)."""
    config = {"isolate": True, "cwd": tempfile.gettempdir(), "hide": [], "limits": {},
              "argv": [python, "-I", "-S", "-c", "pass"], "env": {}}
    try:
        done = subprocess.run([sys.executable, "-I", "-S", _BOOT, json.dumps(config)],
                              capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "python-guard"
    return "netns" if done.returncode == 0 else "python-guard"


class Sandbox:
    """Runs code in a limited subprocess per call (limits and caveats: module docstring).

    Args:
        timeout: default wall-clock seconds per run.
        cpu_seconds: ``RLIMIT_CPU`` (default: ``timeout`` rounded up).
        memory_bytes: ``RLIMIT_AS`` (address space, so leave room for the interpreter).
        max_processes: ``RLIMIT_NPROC``.
        max_output_bytes: cap per output stream.
        max_file_bytes: ``RLIMIT_FSIZE``.
        max_concurrency: runs at once; more wait their turn.
        python: the interpreter for Python source (default: this one; as root with
            ``uid_base``, the first ``python3`` on ``PATH`` that the sandbox uid can execute
            when this one sits in a private directory such as ``/root``).
        network: ``"deny"`` (isolate as well as available) or ``"allow"``.
        uid_base: as root, run the slots as uids from ``uid_base + (pid % 4096) * 256`` on,
            distinct per ``Sandbox`` of this process (``None``: stay root, and
            ``RLIMIT_NPROC`` is then ineffective). Reserve ``uid_base .. uid_base + 2**20``
            for sandboxes: every process of a slot's uid is killed after each run.
    """

    def __init__(self, timeout: float = 10.0, *, cpu_seconds: int | None = None,
                 memory_bytes: int = 1 << 30, max_processes: int = 64,
                 max_output_bytes: int = 64 << 10, max_file_bytes: int = 16 << 20,
                 max_concurrency: int = 4, python: str | None = None,
                 network: Literal["deny", "allow"] = "deny",
                 uid_base: int | None = 2_000_000_000) -> None:
        if timeout <= 0 or max_concurrency < 1 or max_processes < 1 or max_output_bytes < 1:
            raise ValueError("timeout, max_concurrency, max_processes and max_output_bytes "
                             "must be positive")
        if network not in ("deny", "allow"):
            raise ValueError(f"network must be 'deny' or 'allow', got {network!r}")
        self.timeout = timeout
        self.cpu_seconds = cpu_seconds or int(timeout + 0.999)
        self.memory_bytes, self.max_processes = memory_bytes, max_processes
        self.max_output_bytes, self.max_file_bytes = max_output_bytes, max_file_bytes
        self.uid_base = uid_base if os.geteuid() == 0 else None
        self.slot_uids: list[int] = []  # the uid of each slot (as root with a uid_base)
        if self.uid_base is not None:
            first = next(_slot_counter)
            for _ in range(max_concurrency - 1):
                next(_slot_counter)
            process = self.uid_base + (os.getpid() % 4096) * 256
            self.slot_uids = [process + (first + i) % 256 for i in range(max_concurrency)]
        self.python, self.network = python or self._default_python(), network
        self._pool = concurrent.futures.ThreadPoolExecutor(max_concurrency, "sandbox")
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(max_concurrency):
            self._slots.put(slot)

    def _default_python(self) -> str:
        if self.uid_base is None or _world_executable(sys.executable):
            return sys.executable
        found = [p for d in os.get_exec_path() if _world_executable(p := os.path.join(d, "python3"))]
        if not found:
            raise ConfigError(f"the sandbox uid cannot execute {sys.executable} (a directory on "
                              "its path is private) and no python3 on PATH is world-executable; "
                              "pass python=<an interpreter others can run> or uid_base=None")
        return found[0]

    async def run(self, code: str | Sequence[str], *, stdin: str | None = None,
                  timeout: float | None = None, files: Mapping[str, str] | None = None,
                  env: Mapping[str, str] | None = None) -> SandboxResult:
        """Run ``code``: Python source (a ``str``, saved as ``main.py``) or an argv (a list).

        Args:
            code: the source or the argv (``argv[0]`` looked up on the sandbox's ``PATH``).
            stdin: text fed to standard input (none: an empty stdin).
            timeout: wall seconds for this run (default: the sandbox's).
            files: extra ``{relative path: text}`` written into the work directory first.
            env: extra environment variables.

        Returns:
            The ``SandboxResult``; cancelling the await kills the run.

        Raises:
            ValueError: a ``files`` name that is absolute or leaves the work directory.
        """
        _check_files(files)
        cancel = threading.Event()
        future = self._pool.submit(self._execute, code, stdin, timeout, files, env, cancel)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            cancel.set()
            raise

    def run_sync(self, code: str | Sequence[str], *, stdin: str | None = None,
                 timeout: float | None = None, files: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None) -> SandboxResult:
        """``run`` for synchronous callers (same arguments)."""
        _check_files(files)
        return self._pool.submit(self._execute, code, stdin, timeout, files, env,
                                 threading.Event()).result()

    def close(self) -> None:
        """Wait for running calls, then release the worker threads (idempotent)."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _execute(self, code: str | Sequence[str], stdin: str | None, timeout: float | None,
                 files: Mapping[str, str] | None, env: Mapping[str, str] | None,
                 cancel: threading.Event) -> SandboxResult:
        slot = self._slots.get()
        workdir = tempfile.mkdtemp(prefix="aa-sandbox-")
        try:
            return self._spawn(code, stdin, timeout or self.timeout, files or {}, env or {},
                               cancel, workdir, slot)
        except OSError as exc:  # e.g. a file name outside the work dir, no fork possible
            return SandboxResult(None, "", "", setup_error=f"{type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self._slots.put(slot)

    def _spawn(self, code: str | Sequence[str], stdin: str | None, timeout: float,
               files: Mapping[str, str], env: Mapping[str, str], cancel: threading.Event,
               workdir: str, slot: int) -> SandboxResult:
        mode: NetworkIsolation = "none"
        if self.network == "deny":
            mode = isolation(self.python)
        argv = list(code) if not isinstance(code, str) else [self.python, "-E", "-s", "main.py"]
        if isinstance(code, str):
            files = {**files, "main.py": code}
            if mode == "python-guard":
                argv = [self.python, "-E", "-s", "-c", _GUARD]
        elif mode == "python-guard":
            mode = "none"
        for name, text in {**files, ".stdin": stdin or ""}.items():
            path = Path(workdir, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        uid = self.slot_uids[slot] if self.slot_uids else None
        if uid is not None:
            for path in [Path(workdir), *Path(workdir).rglob("*")]:
                os.chown(path, uid, uid)
        config = {
            "isolate": mode == "netns", "cwd": workdir, "hide": _HIDE, "uid": uid, "gid": uid,
            "argv": argv,
            "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                    "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", **env},
            "limits": {"RLIMIT_CPU": [self.cpu_seconds, self.cpu_seconds + 1],
                       "RLIMIT_AS": [self.memory_bytes] * 2,
                       "RLIMIT_NPROC": [self.max_processes] * 2,
                       "RLIMIT_FSIZE": [self.max_file_bytes] * 2, "RLIMIT_CORE": [0, 0]}}
        start = time.monotonic()
        with open(Path(workdir, ".stdin"), "rb") as stdin_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _BOOT, json.dumps(config)], stdin=stdin_file,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        outputs, ended_by = self._collect(proc, start + timeout, cancel)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # the zombie keeps the pgid
        _kill_group(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if uid is not None:
            _kill_uid(uid)
        return self._result(proc.returncode, outputs, ended_by, usage.ru_utime + usage.ru_stime,
                            time.monotonic() - start, mode)

    def _collect(self, proc: subprocess.Popen[bytes], deadline: float,
                 cancel: threading.Event) -> tuple[dict[str, bytearray], str | None]:
        """Read both streams (up to the cap) until the main process has exited and the streams
        are closed, or until the deadline, a cancel or the cap (then kill the group)."""
        outputs = {"stdout": bytearray(), "stderr": bytearray()}
        ended_by, exited = None, False
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ, "stdout")  # type: ignore[arg-type]
            selector.register(proc.stderr, selectors.EVENT_READ, "stderr")  # type: ignore[arg-type]
            while selector.get_map() or not exited:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or cancel.is_set():
                    if not exited:
                        ended_by = "wall_timeout" if remaining <= 0 else "cancelled"
                    _kill_group(proc.pid)
                    break
                if not exited and _has_exited(proc.pid):
                    exited = True  # what the group left behind dies; drain for at most 1 s
                    _kill_group(proc.pid)
                    deadline = min(deadline, time.monotonic() + 1.0)
                if not selector.get_map():
                    cancel.wait(min(remaining, 0.02))
                for key, _ in selector.select(min(remaining, 0.1)) if selector.get_map() else []:
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        selector.unregister(key.fileobj)
                        continue
                    outputs[key.data] += data
                    if len(outputs[key.data]) > self.max_output_bytes and ended_by is None:
                        ended_by = "output_limit"
                        _kill_group(proc.pid)
        for stream in (proc.stdout, proc.stderr):
            stream.close()  # type: ignore[union-attr]
        return outputs, ended_by

    def _result(self, returncode: int, outputs: dict[str, bytearray], ended_by: str | None,
                cpu: float, wall: float, mode: NetworkIsolation) -> SandboxResult:
        texts, truncated = {}, False
        for name, data in outputs.items():
            text = bytes(data[:self.max_output_bytes]).decode("utf-8", "replace")
            if len(data) > self.max_output_bytes:
                truncated = True
                text += f"\n[output truncated: more than {self.max_output_bytes} bytes]"
            texts[name] = text
        setup_error = None
        if returncode == _sandbox_boot.SETUP_FAILED and "sandbox setup failed:" in texts["stderr"]:
            setup_error = texts["stderr"].split("sandbox setup failed:", 1)[1].strip()
        if ended_by is None and returncode < 0:
            sig = signal.Signals(-returncode)
            cpu_out = sig == signal.SIGXCPU or (sig == signal.SIGKILL
                                                and cpu >= self.cpu_seconds - 0.05)
            ended_by = "cpu_limit" if cpu_out else sig.name
        return SandboxResult(
            returncode=returncode, stdout=texts["stdout"], stderr=texts["stderr"],
            timed_out=ended_by == "wall_timeout", killed_by=ended_by, cpu_seconds=cpu,
            wall_seconds=wall, truncated=truncated,
            memory_exceeded=any(m in texts["stderr"] for m in _MEMORY_MARKERS),
            network_isolation=mode, setup_error=setup_error)


def _check_files(files: Mapping[str, str] | None) -> None:
    for name in files or {}:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or name.startswith("."):
            raise ValueError(f"files: {name!r} must be a relative path inside the work "
                             "directory (no '..', not starting with '.')")


def _world_executable(path: str) -> bool:
    """Whether any user may execute ``path`` (the file and every directory above it)."""
    real = Path(path).resolve()
    try:
        return real.is_file() and all(p.stat().st_mode & 0o001 for p in [real, *real.parents])
    except OSError:
        return False


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` (our child) has exited, without reaping it (its pgid stays reserved)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_uid(uid: int) -> None:
    """Kill every process of ``uid`` (the slot's own uid: only sandbox leftovers)."""
    if _pids_of(uid):
        subprocess.run([sys.executable, "-I", "-S", "-c",
                        f"import os; os.setuid({uid}); os.kill(-1, 9)"], check=False)


def _pids_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose effective uid is ``uid``."""
    pids = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in "ZX":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids
