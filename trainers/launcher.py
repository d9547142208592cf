"""Programmatic multi-process launcher: drive a ``torch.distributed`` backend from a script.

``launch(n, fn, *args)`` spawns ``n`` workers (``torch.multiprocessing`` spawn, gloo on CPU /
NCCL on GPU, ``MASTER_ADDR=127.0.0.1`` and a free port, one torch thread each), runs
``fn(*args)`` on every rank and returns the per-rank results. ``DistributedEngineGroup`` keeps
the workers alive around one engine per rank and calls its methods on all ranks at once
(``call``), with per-rank arguments (``call_each``) or streaming a generator's items from rank 0
(``stream``); its calls end in a result or a ``TrainError`` (a rank's traceback, a dead worker,
a timeout), never in a hang. ``trainers/worker_group.WorkerGroupEngine`` builds on it.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) ``launch`` runs ``fn`` in the current process
instead (initialising the process group if needed) and returns ``[result]``.

``fn``, the engine factory and every argument are serialised with cloudpickle: functions
defined in a notebook cell, in ``__main__`` or inside another function (closures) work, as do
module-level ones. Workers watch their parent: when it dies (a notebook kernel restarted, a
controller killed with SIGKILL) they exit within about a second instead of lingering.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait as mp_wait
from typing import Any

import cloudpickle
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from areal_agents.errors import TrainError

from .affinity import pin_process


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_context() -> Any:
    """The ``spawn`` context, after giving ``__main__`` back the ``__spec__`` spawn reads:
    IPython's ``%reset`` deletes it from a notebook's namespace (``AttributeError`` on start)."""
    main = sys.modules.get("__main__")
    if main is not None and not hasattr(main, "__spec__"):
        main.__spec__ = None  # what an interactive __main__ has
    return mp.get_context("spawn")


def _init(rank: int, world_size: int, port: int, threads: int, device: str | None = None) -> None:
    """Join the process group: NCCL on ``device="cuda"`` (rank ``r`` on ``cuda:r % count``),
    gloo on ``"cpu"``; ``None`` picks cuda when available."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)


def _watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Exit this worker once ``parent_pid`` is no longer its parent (the parent died and the
    worker was re-parented), from a daemon thread: no orphaned ranks after a kernel restart."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)  # the main thread may be blocked in a collective: end the process now

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _run(rank: int, world_size: int, port: int, threads: int, queue: Any, inbox: Any,
         parent_pid: int) -> None:
    try:
        _watch_parent(parent_pid)
        fn, args = pickle.loads(inbox.recv_bytes())
        _init(rank, world_size, port, threads)
        queue.put(_dumps((rank, True, fn(*args))))
    except BaseException:
        queue.put(_dumps((rank, False, traceback.format_exc())))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


MAIN_GUARD_HINT = (
    "a worker that exits while starting usually means the script trains at import time: "
    "worker processes are spawned and import your main module, so put the training under "
    "`if __name__ == \"__main__\":`")


def _send_payload(conn: Any, payload: bytes, rank: int) -> None:
    """Send a started worker its payload (the engine factory or function, pickled).

    The payload travels over a pipe after ``start()``, not in the process object: a large
    payload written by ``start()`` blocks until the child reads it, so a child that dies while
    importing the main module (a script without a main guard) would leave ``start()`` blocked
    for ever; here its death is a ``TrainError``.
    """
    try:
        conn.send_bytes(payload)
    except (BrokenPipeError, ConnectionResetError, EOFError) as exc:
        raise TrainError(f"worker rank {rank} exited before it read its task ({MAIN_GUARD_HINT})"
                         ) from exc


def _dumps(value: Any) -> bytes:
    # cloudpickle (by value for __main__ and local functions) copies tensor data like plain
    # pickle; torch.multiprocessing's shared-memory handles would dangle once the worker exits
    return cloudpickle.dumps(value)


def _send(conn: Any, value: Any) -> None:
    conn.send_bytes(_dumps(value))


def _recv(conn: Any) -> Any:
    return pickle.loads(conn.recv_bytes())


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ


def launch(num_processes: int, fn: Callable[..., Any], *args: Any, threads: int = 1,
           timeout: float = 600.0) -> list[Any]:
    """Run ``fn(*args)`` on ``num_processes`` ranks; return results ordered by rank.

    Raises:
        TrainError: a worker failed (the message holds its traceback) or timed out.
    """
    if _under_torchrun():
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return [fn(*args)]
    ctx = _spawn_context()
    queue = ctx.SimpleQueue()
    port = free_port()
    payload = _dumps((fn, args))
    inboxes = [ctx.Pipe(duplex=False) for _ in range(num_processes)]
    procs = [
        ctx.Process(target=_run, daemon=True,
                    args=(r, num_processes, port, threads, queue, inboxes[r][0], os.getpid()))
        for r in range(num_processes)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for r, (reader, writer) in enumerate(inboxes):
            reader.close()  # the child holds the read end: its death is then a broken pipe
            _send_payload(writer, payload, r)
            writer.close()
        for _ in procs:
            rank, ok, value = _get(queue, procs, timeout)
            if not ok:
                raise TrainError(f"worker rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(num_processes)]


def _get(queue: Any, procs: list, timeout: float) -> Any:
    """Next queue item; fails fast if a worker died without reporting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not queue.empty():
            return pickle.loads(queue.get())
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead and queue.empty():
            time.sleep(0.5)
            if queue.empty():
                raise TrainError(f"worker exited with code {dead[0].exitcode} without a result")
        time.sleep(0.01)
    raise TrainError(f"workers gave no result within {timeout} s")


def _serve(rank: int, world_size: int, port: int, threads: int, device: str | None, conn: Any,
           parent_pid: int, cpus: tuple[int, ...] | None = None) -> None:
    """A worker: build the engine, then answer ``(method, args, kwargs, stream)`` messages
    until ``None``. Replies are ``(ok, value)``; a streamed call sends ``(True, (True, item))``
    per item (rank 0 only; other ranks drain the generator, whose steps are collectives) and
    ``(True, (False, None))`` at its end."""
    try:
        _watch_parent(parent_pid)
        factory, args, kwargs = pickle.loads(conn.recv_bytes())  # _send_payload
        if cpus is not None:  # before any torch thread pool starts; threads never exceed cpus
            threads = pin_process(cpus, threads)
        _init(rank, world_size, port, threads, device)
        engine = factory(*args, **kwargs)
        _send(conn, (True, None))
        while True:
            msg = _recv(conn)
            if msg is None:
                break
            method, m_args, m_kwargs, stream = msg
            try:
                target = getattr(engine, method)
                value = target(*m_args, **m_kwargs) if callable(target) else target
                if stream:
                    for item in value:
                        if rank == 0:
                            _send(conn, (True, (True, item)))
                    value = (False, None)
                elif method == "export_weights" or hasattr(value, "__next__"):
                    value = list(value)  # generators are collectives: drain on every rank
                _send(conn, (True, value))
            except Exception:
                _send(conn, (False, traceback.format_exc()))
        if hasattr(engine, "close"):
            engine.close()
    except Exception:
        _send(conn, (False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedEngineGroup:
    """One engine per worker process; ``group.call(method, ...)`` runs it on every rank.

    Attribute access proxies to rank 0's result: ``group.train_step(batch, loss)`` returns
    rank 0's stats. Use as a context manager or call ``close()``.

    A call never hangs: a rank that raises makes the call a ``TrainError`` carrying its
    traceback (the others are given ``grace`` seconds to answer, since they may wait for it in
    a collective; if they do not, the group is stopped), a worker that dies or gives no reply
    within ``timeout`` seconds stops the group too. After a stop every call is a ``TrainError``.

    Args:
        num_processes: ranks (worker processes).
        factory: ``factory(*args, **kwargs)`` builds the engine on each rank (serialised with
            cloudpickle: a function defined in a notebook cell works).
        threads: torch (OMP) threads per rank.
        device: ``"cuda"`` (NCCL, one GPU per rank), ``"cpu"`` (gloo) or ``None`` (cuda when
            available).
        timeout: seconds a call may take.
        grace: seconds the other ranks get to answer once a rank failed.
        start_timeout: seconds the workers may take to start and build their engines.
        cpus: per rank, the CPU ids it pins itself to at start-up (``affinity.pin_process``;
            its torch threads become ``min(threads, len(cpus))``), or ``None`` (not pinned);
            ``None`` pins no rank.

    Example:
        >>> with DistributedEngineGroup(2, make_engine) as group:  # doctest: +SKIP
        ...     stats = group.train_step(batch, loss_fn)
    """

    def __init__(self, num_processes: int, factory: Callable[..., Any], *args: Any,
                 threads: int = 1, device: str | None = None, timeout: float = 3600.0,
                 grace: float = 10.0, start_timeout: float = 600.0,
                 cpus: Sequence[tuple[int, ...] | None] | None = None, **kwargs: Any) -> None:
        if cpus is not None and len(cpus) != num_processes:
            raise ValueError(f"cpus: {len(cpus)} entries for {num_processes} ranks; give one "
                             "per rank (None: that rank unpinned)")
        ctx = _spawn_context()
        port = free_port()
        self.timeout, self.grace = timeout, grace
        self._conns, self._procs = [], []
        self._stopped: str | None = None
        self._dead: set[int] = set()
        payload = _dumps((factory, args, kwargs))
        for r in range(num_processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, daemon=True, args=(
                r, num_processes, port, threads, device, child, os.getpid(),
                None if cpus is None else cpus[r]))
            p.start()
            child.close()  # the parent keeps only its end: a dead worker then reads as EOF
            self._conns.append(parent)
            self._procs.append(p)
        try:
            for r, conn in enumerate(self._conns):
                _send_payload(conn, payload, r)
            self._gather("__init__", range(num_processes), timeout=start_timeout)
        except TrainError:
            self.close()
            raise

    @property
    def num_processes(self) -> int:
        return len(self._procs)

    def _reply(self, rank: int) -> tuple[bool, Any] | None:
        """Rank ``rank``'s reply if one is ready, a failure if its worker died, else None."""
        conn, proc = self._conns[rank], self._procs[rank]
        exited = proc.exitcode is not None  # read before polling: a reply sent before the
        try:                                # exit is then always seen
            if conn.poll():
                return _recv(conn)
        except (EOFError, OSError):
            exited = True
        if not exited:
            return None
        proc.join(timeout=1)
        self._dead.add(rank)
        return False, f"worker process exited (exit code {proc.exitcode}) without a reply"

    def _gather(self, method: str, ranks: Any = None, timeout: float | None = None) -> list[Any]:
        """The replies of ``ranks`` (all by default; waiting at most ``timeout``, default
        ``self.timeout``), ordered by rank.

        Raises:
            TrainError: some rank failed (the lowest failing rank's traceback), died, or timed
                out; the group is stopped unless every rank answered and none died.
        """
        pending = set(range(self.num_processes) if ranks is None else ranks)
        replies: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while pending:
            waitables = [self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending]
            mp_wait(waitables, timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            for r in sorted(pending):
                reply = self._reply(r)
                if reply is not None:
                    replies[r] = reply
                    pending.discard(r)
            if any(not ok for ok, _ in replies.values()):
                deadline = min(deadline, time.monotonic() + self.grace)
            if pending and time.monotonic() >= deadline:
                break
        # a dead worker first: the others' errors are then mostly the broken collective
        failed = sorted((r for r, (ok, _) in replies.items() if not ok),
                        key=lambda r: (r not in self._dead, r))
        if pending or self._dead:
            self._stop(f"ranks {sorted(pending | self._dead)} stopped answering {method}")
        if failed:
            also = "".join(f"\n(rank {r} failed too: {str(replies[r][1]).strip().splitlines()[-1]})"
                           for r in failed[1:])
            note = (f"\n(ranks {sorted(pending)} did not answer within {self.grace} s; the "
                    "worker group was stopped)") if pending else ""
            if method == "__init__" and failed[0] in self._dead:
                note += f"\n({MAIN_GUARD_HINT})"
            raise TrainError(f"engine rank {failed[0]} failed:\n{replies[failed[0]][1]}{also}"
                             f"{note}")
        if pending:
            raise TrainError(f"engine ranks {sorted(pending)} gave no reply to {method} within "
                             f"{self.timeout if timeout is None else timeout} s; the worker group "
                             "was stopped")
        return [replies[r][1] for r in sorted(replies)]

    def _check_running(self) -> None:
        if self._stopped is not None:
            raise TrainError(f"the worker group was stopped ({self._stopped}); build a new one")

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``engine.method(*args, **kwargs)`` on every rank; results ordered by rank.

        Raises:
            TrainError: the method raised on some rank (the workers stay usable when every
                rank answered), a worker died, or the call timed out (the group is stopped).
        """
        return self.call_each(method, [(args, kwargs)] * self.num_processes)

    def call_each(self, method: str, per_rank: list[tuple[tuple, dict]]) -> list[Any]:
        """Call ``engine.method(*args_r, **kwargs_r)`` on rank ``r`` with ``per_rank[r]``
        (e.g. each data-parallel rank its own rows); results ordered by rank.

        Raises:
            ValueError: ``len(per_rank)`` is not the number of ranks.
            TrainError: as ``call``.
        """
        self._check_running()
        if len(per_rank) != self.num_processes:
            raise ValueError(f"per_rank has {len(per_rank)} entries for {self.num_processes} ranks")
        encoded: dict[tuple[int, int], bytes] = {}  # ranks given the same objects share a pickle
        for conn, (args, kwargs) in zip(self._conns, per_rank, strict=True):
            key = id(args), id(kwargs)
            if key not in encoded:
                encoded[key] = _dumps((method, args, kwargs, False))
            self._write(conn, encoded[key], method)
        return self._gather(method)

    def stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Iterate the generator ``engine.method(...)`` on every rank and yield rank 0's
        items one message at a time (for ``export_weights``: one tensor in flight, not a
        model copy). Abandoning the iterator drains the rest.

        Raises:
            TrainError: as ``call``.
        """
        self._check_running()
        data = _dumps((method, args, kwargs, True))
        for conn in self._conns:
            self._write(conn, data, method)
        rank0_done = rank0_failed = False
        try:
            while True:
                try:
                    more, item = self._gather(method, [0])[0]
                except TrainError:
                    rank0_done = rank0_failed = True
                    raise
                if not more:
                    rank0_done = True
                    break
                yield item
        finally:
            if self._stopped is None and not rank0_done:  # abandoned: drain rank 0's items
                while self._gather(method, [0])[0][0]:
                    pass
            if self._stopped is None and self.num_processes > 1:
                if rank0_failed:  # the others may wait for rank 0 in a collective: grace only
                    with contextlib.suppress(TrainError):
                        self._gather(method, range(1, self.num_processes), timeout=self.grace)
                else:
                    self._gather(method, range(1, self.num_processes))

    def _write(self, conn: Any, data: bytes, method: str) -> None:
        try:
            conn.send_bytes(data)
        except (BrokenPipeError, OSError) as exc:
            self._stop(f"a worker's pipe closed during {method}")
            raise TrainError(f"a training worker is gone ({exc}); the worker group was "
                             "stopped") from exc

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: self.call(name, *a, **k)[0]

    def _stop(self, reason: str) -> None:
        """Kill every worker now (they may be stuck in a collective with a failed rank)."""
        self._stopped = reason
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=10)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._stopped is None:
            for conn in self._conns:
                with contextlib.suppress(OSError, BrokenPipeError):
                    _send(conn, None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        self._stopped = self._stopped or "closed"

    def __enter__(self) -> DistributedEngineGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
