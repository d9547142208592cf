"""``RayEngineGroup``: a worker group whose ranks are Ray actors in one placement group.

It is ``launcher.DistributedEngineGroup`` with Ray doing placement and process lifetime:
the same interface (``call``, ``call_each``, ``stream``, ``close``), the same per-rank
engine (``WorkerGroupEngine`` hands it ``worker_group._build_rank_engine``, which builds a
``_RankEngine``), the same errors (``TrainError`` with the failing rank's traceback; a dead
actor stops the group). ``WorkerGroupEngine(group=...)`` takes it in place of the default.

Rendezvous comes from the placement: rank ``r`` runs in bundle ``r`` (one bundle per device;
``STRICT_PACK`` keeps a training group on one node), and rank 0's actor names
``MASTER_ADDR`` (its node's IP) and ``MASTER_PORT`` (a port free there) for every rank's
``torch.distributed.init_process_group`` (gloo on CPU, NCCL on GPU, where Ray's
``CUDA_VISIBLE_DEVICES`` leaves each rank its one GPU as ``cuda:0``).
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle

from areal_agents.errors import TrainError

__all__ = ["RayEngineGroup"]


class _Rank:
    """One rank: joins the process group, builds the engine, runs its methods."""

    def __init__(self) -> None:
        self.engine: Any = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a TCP port free on it (rank 0: the rendezvous)."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind(("", 0))
            return ip, int(sock.getsockname()[1])

    def start(self, rank: int, world_size: int, master: tuple[str, int], threads: int,
              device: str, payload: bytes) -> None:
        import torch
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          OMP_NUM_THREADS=str(threads))
        torch.set_num_threads(threads)
        if device == "cuda":
            torch.cuda.set_device(0)  # Ray gives each rank's actor its own GPU
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank,
                                world_size=world_size)
        factory, args, kwargs = pickle.loads(payload)
        self.engine = factory(*args, **kwargs)

    def call(self, payload: bytes) -> Any:
        method, args, kwargs = pickle.loads(payload)
        target = getattr(self.engine, method)
        value = target(*args, **kwargs) if callable(target) else target
        if hasattr(value, "__next__"):
            value = list(value)  # generators are collectives: drain on every rank
        return value

    def stream(self, payload: bytes) -> Iterator[Any]:
        method, args, kwargs = pickle.loads(payload)
        yield from getattr(self.engine, method)(*args, **kwargs)

    def close(self) -> None:
        import torch.distributed as dist

        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
        self.engine = None
        if dist.is_initialized():
            dist.destroy_process_group()


class RayEngineGroup:
    """One engine per Ray actor, rank ``r`` in bundle ``r`` of ``placement_group``.

    Args:
        num_processes: ranks (the placement group has at least this many bundles).
        factory: ``factory(*args, **kwargs)`` builds the engine on each rank (cloudpickle).
        placement_group: a ready Ray placement group (``ray_launcher.train_placement_group``).
        bundle: the resources of one bundle (``{"GPU": 1}`` or ``{"CPU": c}``); each actor
            takes exactly them.
        threads: torch (OMP) threads per rank.
        device: ``"cuda"`` (NCCL) or ``"cpu"`` (gloo).
        timeout: seconds one call may take before the group is stopped.
        start_timeout: seconds the ranks may take to start and build their engines.

    Raises:
        TrainError: a rank failed to start (its traceback), or later as ``call`` says.
    """

    def __init__(self, num_processes: int, factory: Callable[..., Any], *args: Any,
                 placement_group: Any, bundle: dict[str, float], threads: int = 1,
                 device: str | None = None, timeout: float = 3600.0, grace: float = 10.0,
                 start_timeout: float = 600.0, **kwargs: Any) -> None:
        import ray

        from .ray_actors import actor_options

        del grace  # Ray reports a failed rank at once; nothing to wait for
        self.timeout = timeout
        self._stopped: str | None = None
        actor_cls = ray.remote(_Rank)
        self._actors = [actor_cls.options(**actor_options(bundle, placement_group, r)).remote()
                        for r in range(num_processes)]
        payload = cloudpickle.dumps((factory, args, kwargs))
        try:
            master = self._get([self._actors[0].address.remote()], "address", start_timeout)[0]
            self._get([a.start.remote(r, num_processes, master, threads, device or "cpu",
                                      payload) for r, a in enumerate(self._actors)],
                      "__init__", start_timeout)
        except TrainError:
            self.close()
            raise

    @property
    def num_processes(self) -> int:
        return len(self._actors)

    def _get(self, refs: list[Any], method: str, timeout: float | None = None) -> list[Any]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=self.timeout if timeout is None else timeout)
        except RayTaskError as exc:
            rank = next((r for r, ref in enumerate(refs) if _failed(ref)), 0)
            raise TrainError(f"engine rank {rank} failed:\n{exc}") from None
        except RayActorError as exc:
            self._stop(f"a rank's actor died during {method}")
            raise TrainError(f"a training worker (Ray actor) died during {method}: {exc}; the "
                             "worker group was stopped") from None
        except GetTimeoutError:
            self._stop(f"{method} timed out")
            raise TrainError(f"engine ranks gave no reply to {method} within {self.timeout} s; "
                             "the worker group was stopped") from None

    def _check_running(self) -> None:
        if self._stopped is not None:
            raise TrainError(f"the worker group was stopped ({self._stopped}); build a new one")

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``engine.method(*args, **kwargs)`` on every rank; results ordered by rank."""
        return self.call_each(method, [(args, kwargs)] * self.num_processes)

    def call_each(self, method: str, per_rank: list[tuple[tuple, dict]]) -> list[Any]:
        """``engine.method(*per_rank[r])`` on rank ``r``; results ordered by rank.

        Raises:
            ValueError: ``len(per_rank)`` is not the number of ranks.
            TrainError: a rank raised (its traceback), an actor died or the call timed out
                (the group is then stopped).
        """
        self._check_running()
        if len(per_rank) != self.num_processes:
            raise ValueError(f"per_rank has {len(per_rank)} entries for {self.num_processes} ranks")
        refs = [a.call.remote(cloudpickle.dumps((method, args, kwargs)))
                for a, (args, kwargs) in zip(self._actors, per_rank, strict=True)]
        return self._get(refs, method)

    def stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Rank 0's items of the generator ``engine.method(...)``, one Ray object each (the
        other ranks drain theirs: its steps are collectives)."""
        self._check_running()
        payload = cloudpickle.dumps((method, args, kwargs))
        others = [a.call.remote(payload) for a in self._actors[1:]]
        items = self._actors[0].stream.options(num_returns="streaming").remote(payload)
        for ref in items:
            yield self._get([ref], method)[0]
        self._get(others, method)

    def _stop(self, reason: str) -> None:
        import ray

        self._stopped = reason
        for actor in self._actors:
            ray.kill(actor)

    def close(self) -> None:
        """Close every rank's engine and end the actors (idempotent)."""
        import ray

        if self._stopped is None:
            try:
                ray.get([a.close.remote() for a in self._actors], timeout=60)
            except Exception:  # a rank that cannot close is killed below in any case
                traceback.print_exc()
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        self._stopped = self._stopped or "closed"

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: self.call(name, *a, **k)[0]


def _failed(ref: Any) -> bool:
    """Whether ``ref`` is done and raised (a pending one has not failed yet)."""
    import ray

    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ref)
    except Exception:
        return True
    return False
