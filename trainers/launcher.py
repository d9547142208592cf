"""Programmatic multi-process launcher: drive a ``torch.distributed`` backend from a script.

``launch(n, fn, *args)`` spawns ``n`` workers (``torch.multiprocessing`` spawn, gloo on CPU /
NCCL on GPU, ``MASTER_ADDR=127.0.0.1`` and a free port, one torch thread each), runs
``fn(*args)`` on every rank and returns the per-rank results. ``DistributedEngineGroup`` keeps
the workers alive around one engine per rank and calls its methods on all ranks at once.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) ``launch`` runs ``fn`` in the current process
instead (initialising the process group if needed) and returns ``[result]``.

``fn``, the engine factory and every argument must be picklable (module-level functions).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from areal_agents.errors import TrainError


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank: int, world_size: int, port: int, threads: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size)


def _run(rank: int, world_size: int, port: int, threads: int, queue: Any, fn: Callable, args: tuple) -> None:
    try:
        _init(rank, world_size, port, threads)
        queue.put(_dumps((rank, True, fn(*args))))
    except BaseException:
        queue.put(_dumps((rank, False, traceback.format_exc())))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _dumps(value: Any) -> bytes:
    # plain pickle copies tensor data; torch.multiprocessing's shared-memory handles would
    # dangle once the worker exits
    return pickle.dumps(value)


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
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_run, args=(r, num_processes, port, threads, queue, fn, args), daemon=True)
        for r in range(num_processes)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
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


def _serve(rank: int, world_size: int, port: int, threads: int, conn: Any,
           factory: Callable, args: tuple, kwargs: dict) -> None:
    try:
        _init(rank, world_size, port, threads)
        engine = factory(*args, **kwargs)
        _send(conn, (True, None))
        while True:
            msg = _recv(conn)
            if msg is None:
                break
            method, m_args, m_kwargs = msg
            try:
                target = getattr(engine, method)
                value = target(*m_args, **m_kwargs) if callable(target) else target
                if method == "export_weights" or hasattr(value, "__next__"):
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

    Example:
        >>> with DistributedEngineGroup(2, make_engine) as group:  # doctest: +SKIP
        ...     stats = group.train_step(batch, loss_fn)
    """

    def __init__(self, num_processes: int, factory: Callable[..., Any], *args: Any,
                 threads: int = 1, **kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._conns, self._procs = [], []
        for r in range(num_processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, daemon=True,
                            args=(r, num_processes, port, threads, child, factory, args, kwargs))
            p.start()
            self._conns.append(parent)
            self._procs.append(p)
        try:
            self._gather()
        except TrainError:
            self.close()
            raise

    def _gather(self) -> list[Any]:
        """Every rank's reply; raises ``TrainError`` (first failing rank's traceback) if any failed."""
        replies = [_recv(conn) for conn in self._conns]
        for rank, (ok, value) in enumerate(replies):
            if not ok:
                raise TrainError(f"engine rank {rank} failed:\n{value}")
        return [value for _, value in replies]

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``engine.method(*args, **kwargs)`` on every rank; results ordered by rank.

        Raises:
            TrainError: the method raised on some rank (the workers stay usable).
        """
        for conn in self._conns:
            _send(conn, (method, args, kwargs))
        return self._gather()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: self.call(name, *a, **k)[0]

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                _send(conn, None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self._conns, self._procs = [], []

    def __enter__(self) -> DistributedEngineGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
