"""Where a policy trains and serves: ``TrainPlacement``, ``InferencePlacement`` and their checks.

``TrainPlacement`` lays a policy's train engine out over ``world_size`` worker processes
(``world_size=1``, the default, trains in the controller's own process); ``InferencePlacement``
says how its inference engines run and how trained weights reach them. Both are frozen, typed
values; impossible layouts raise ``ConfigError`` naming the fix.

Rank layout (outer to inner, as Archon's ``ParallelDims`` and megatron-core order them)::

    rank = pp_index * (dp * tp) + dp_index * tp + tp_index

so the ``tp`` ranks of one tensor-parallel group are neighbours and share one data-parallel
index (they need the same rows of a batch), and pipeline stages are outermost.

Which degrees each backend implements is one table, ``PARALLELISM`` (with ``ALONE``: degrees a
backend runs only with every other degree 1); ``check_train_placement`` holds a placement
against them.

Example:
    >>> TrainPlacement(world_size=4, tp=2).dp
    2
    >>> [TrainPlacement(world_size=4, tp=2).dp_rank(r) for r in range(4)]
    [0, 0, 1, 1]
    >>> check_train_placement("fsdp", TrainPlacement(world_size=2, tp=2))
    Traceback (most recent call last):
    ...
    areal_agents.errors.ConfigError: Policy.train: fsdp supports only data parallelism (dp); use backend='archon' for tp=2
    >>> InferencePlacement.of("vllm").kind
    'vllm'
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast, get_args

from areal_agents.errors import ConfigError

__all__ = ["ALONE", "PARALLELISM", "TRANSPORTS", "InferencePlacement", "TrainPlacement",
           "check_train_placement", "engine_parallel_kwargs"]

Device = Literal["cpu", "cuda"]
InferenceKind = Literal["in_process", "server", "vllm", "sglang"]
Transport = Literal["tensors", "shm", "disk", "gloo", "nccl"]

PARALLELISM: dict[str, frozenset[str]] = {
    "fsdp": frozenset({"dp"}),  # FSDP2 over all world_size ranks
    "archon": frozenset({"dp", "tp", "pp", "ep"}),
    "megatron": frozenset({"dp", "tp"}),
}
"""Backend -> the parallel degrees it implements beyond one process. A backend missing here
(e.g. one added with ``register_backend``) trains in one process only; add its entry to train
it on several."""

ALONE: dict[str, frozenset[str]] = {
    "archon": frozenset({"pp"}),  # its pipeline runs dense models with dp = tp = ep = 1
}
"""Backend -> the degrees of ``PARALLELISM`` it runs only when every other degree is 1."""

_ENGINE_KWARGS: dict[str, dict[str, str]] = {
    "archon": {"dp": "dp_shard", "tp": "tp", "pp": "pp", "ep": "ep"},
    "megatron": {"tp": "tensor_parallel"},
}
"""Backend -> placement degree -> the engine's keyword argument (the other degrees follow from
the process group: FSDP shards over all ranks, megatron's dp is ``world_size / tp``)."""


def _positive(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


def _choice(owner: str, name: str, value: Any, allowed: Any) -> None:
    choices = get_args(allowed)
    if value is not None and value not in choices:
        raise ConfigError(f"{owner}.{name}={value!r}; choose one of {list(choices)} (or omit it)")


def _coerce(cls: type, value: Any, owner: str) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{owner}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**value)
    raise ConfigError(f"{owner} must be a {cls.__name__} or a dict of its fields, got "
                      f"{type(value).__name__}")


@dataclass(frozen=True)
class TrainPlacement:
    """How one policy's train engine is laid out over processes.

    Args:
        world_size: training processes; ``1`` trains in the controller's process (the
            default: no workers, no copies), ``> 1`` spawns that many worker processes.
        dp: data-parallel degree; ``None`` derives ``world_size // (tp * pp)``.
        tp: tensor-parallel degree (heads and MLP columns split; archon, megatron).
        pp: pipeline-parallel degree (layers split into stages; archon).
        ep: expert-parallel degree of MoE experts (archon; 1 or ``dp``).
        device: ``"cpu"`` or ``"cuda"`` (rank ``r`` uses ``cuda:r % device_count``); ``None``
            picks cuda when available, else cpu.
        threads: torch (OMP) threads of each worker rank.
        workers: train in worker processes even with ``world_size=1`` (a group of one rank),
            so training does not share the controller's Python process (and its GIL) with
            generation, the gateway and the episodes.
        cpus: pin the worker ranks to these CPU ids (Linux ``sched_setaffinity``, applied by
            each rank at start-up; ``trainers/affinity.py``): one list for every rank
            (``[1]``), or one list per rank (``[[1], [2, 3]]``); each rank's torch threads are
            then ``min(threads, len(its cpus))``. ``None`` (default): no pinning. Ids are
            checked against the CPUs this process may use; only for worker processes
            (``workers`` or ``world_size > 1``).

    Raises:
        ConfigError: a degree < 1, ``dp * tp * pp != world_size``, or ``cpus`` naming CPUs
            this host does not offer, with a per-rank count other than ``world_size``, or
            without worker processes.

    Example:
        >>> TrainPlacement(world_size=2)  # doctest: +NORMALIZE_WHITESPACE
        TrainPlacement(world_size=2, dp=2, tp=1, pp=1, ep=1, device=None, threads=1,
                       workers=False, cpus=None)
        >>> TrainPlacement(world_size=2, cpus=[0]).rank_cpus(1)
        (0,)
    """

    world_size: int = 1
    dp: int | None = None
    tp: int = 1
    pp: int = 1
    ep: int = 1
    device: Device | None = None
    threads: int = 1
    workers: bool = False
    cpus: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        owner = "Policy.train"
        for name in ("world_size", "tp", "pp", "ep", "threads"):
            _positive(owner, name, getattr(self, name))
        _choice(owner, "device", self.device, Device)
        model_parallel = self.tp * self.pp
        if self.dp is None:
            if self.world_size % model_parallel:
                raise ConfigError(f"{owner}: world_size={self.world_size} is not divisible by "
                                  f"tp*pp={model_parallel}; set world_size to a multiple of it")
            object.__setattr__(self, "dp", self.world_size // model_parallel)
        _positive(owner, "dp", self.dp)
        if self.dp * model_parallel != self.world_size:
            raise ConfigError(f"{owner}: dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = "
                              f"{self.dp * model_parallel} must equal world_size="
                              f"{self.world_size}; set world_size={self.dp * model_parallel} or "
                              "leave dp unset (derived)")
        if self.cpus is not None:
            object.__setattr__(self, "cpus", self._checked_cpus(self.cpus))

    def _checked_cpus(self, cpus: Any) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
        """``cpus`` validated: one CPU list for every rank, or one list per rank."""
        from .affinity import check_cpus

        owner = "Policy.train.cpus"
        if not self.distributed:
            raise ConfigError(f"{owner} pins train worker processes, but this placement trains "
                              "in the controller's process; set workers=True (or world_size > "
                              "1), or pin the controller with the trainer's cpus")
        if isinstance(cpus, (str, bytes)) or not isinstance(cpus, (list, tuple)):
            raise ConfigError(f"{owner} must be a list of CPU ids or one such list per rank, got "
                              f"{cpus!r}")
        if cpus and all(isinstance(c, (list, tuple)) for c in cpus):
            if len(cpus) != self.world_size:
                raise ConfigError(f"{owner}: {len(cpus)} per-rank CPU lists for world_size="
                                  f"{self.world_size}; give one list per rank, or one flat "
                                  "list for every rank")
            return tuple(check_cpus(f"{owner}[{r}]", c) for r, c in enumerate(cpus))
        return check_cpus(owner, cpus)

    def rank_cpus(self, rank: int) -> tuple[int, ...] | None:
        """The CPU ids rank ``rank`` is pinned to (``None``: not pinned)."""
        if self.cpus is None:
            return None
        if isinstance(self.cpus[0], tuple):  # one list per rank
            return cast("tuple[int, ...]", self.cpus[rank])
        return cast("tuple[int, ...]", self.cpus)

    @classmethod
    def of(cls, value: TrainPlacement | dict[str, Any]) -> TrainPlacement:
        """``value`` as a ``TrainPlacement`` (a dict gives its fields).

        Raises:
            ConfigError: unknown fields, a wrong type, or an impossible layout.
        """
        return _coerce(cls, value, "Policy.train")

    @property
    def distributed(self) -> bool:
        """Whether the engine runs in worker processes (``world_size > 1`` or ``workers``)."""
        return self.world_size > 1 or self.workers

    def resolved_device(self) -> str:
        """``device``, or ``"cuda"`` when CUDA is available and ``"cpu"`` otherwise."""
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def dp_rank(self, rank: int) -> int:
        """The data-parallel index of global ``rank`` (see the module's rank layout).

        Raises:
            ValueError: ``rank`` outside ``[0, world_size)``.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        assert self.dp is not None  # derived in __post_init__
        return (rank // self.tp) % self.dp


def check_train_placement(backend: str, train: TrainPlacement, *, trainable: bool = True) -> None:
    """Refuse a layout that ``backend`` cannot run (``PARALLELISM``).

    Args:
        backend: the policy's training backend.
        train: its placement.
        trainable: ``False`` for frozen and endpoint policies, which have no train engine.

    Raises:
        ConfigError: a frozen policy with ``world_size > 1``, a degree the backend does not
            implement, or archon's ``ep`` other than 1 or ``dp``; the message names the fix.
    """
    if not train.distributed:
        return
    if not trainable:
        raise ConfigError(f"Policy.train: world_size={train.world_size} but the policy is frozen "
                          "(no train engine); remove train or set frozen=False")
    supported = PARALLELISM.get(backend)
    if supported is None:
        raise ConfigError(f"Policy.train: backend {backend!r} has no multi-process support "
                          f"registered; use world_size=1, one of {sorted(PARALLELISM)}, or add "
                          f"its degrees to areal_agents.trainers.placement.PARALLELISM")
    wanted = {d: getattr(train, d) for d in ("dp", "tp", "pp", "ep") if getattr(train, d) > 1}
    missing = {d: n for d, n in wanted.items() if d not in supported}
    if missing:
        names = ", ".join(sorted(supported))
        fix = [b for b, dims in PARALLELISM.items() if set(missing) <= dims]
        use = f"use backend={fix[0]!r} for " if fix else "no backend supports "
        only = "only data parallelism (dp)" if supported == {"dp"} else names
        raise ConfigError(f"Policy.train: {backend} supports {only}; {use}"
                          + ", ".join(f"{d}={n}" for d, n in missing.items()))
    alone = sorted(set(wanted) & ALONE.get(backend, frozenset()))
    if alone and len(wanted) > 1:
        others = ", ".join(sorted(supported - set(alone)))
        got = ", ".join(f"{d}={n}" for d, n in wanted.items())
        raise ConfigError(f"Policy.train: {backend} runs {alone[0]} only alone (got {got}); "
                          f"supported layouts: {others} combined, or {alone[0]} alone; set world_size="
                          f"{wanted[alone[0]]} with only {alone[0]}, or {alone[0]}=1")
    if train.ep > 1 and train.ep != train.dp:
        raise ConfigError(f"Policy.train: ep={train.ep} must be 1 or dp={train.dp} (experts are "
                          "split over the data-parallel ranks)")


def engine_parallel_kwargs(backend: str, train: TrainPlacement) -> dict[str, int]:
    """The engine keyword arguments that realise ``train`` on ``backend`` (e.g. archon's
    ``dp_shard``/``tp``/``pp``/``ep``; none for fsdp, which shards over every rank)."""
    names = _ENGINE_KWARGS.get(backend, {})
    return {arg: getattr(train, degree) for degree, arg in names.items()}


TRANSPORTS: dict[str, tuple[Transport, ...]] = {
    "in_process": ("tensors", "disk"),
    "server": ("shm", "disk", "gloo"),
    "vllm": ("disk", "nccl"),
    "sglang": ("disk", "nccl"),
}
"""Inference kind -> the weight transports it can use, the automatic choice first (the one
table of how trained weights reach an engine; ``trainers/weight_push.py`` carries them out).
``gloo`` and ``nccl`` are one code path (a broadcast over a weight-update process group,
``trainers/weight_nccl.py``) on CPU and CUDA tensors; the engine server runs on the CPU, so it
takes ``gloo``."""


@dataclass(frozen=True)
class InferencePlacement:
    """How one policy's inference engines run and how trained weights reach them.

    Args:
        kind: ``"in_process"`` (a ``LocalEngine`` in the controller, the default),
            ``"server"`` (our own inference server process), ``"vllm"`` or ``"sglang"``.
        replicas: engines behind the policy's router (with ``urls``: one per URL).
        device: ``"cpu"`` or ``"cuda"``; ``None`` picks cuda when available.
        transport: how weights move: ``"tensors"`` (in process), ``"shm"`` (shared memory,
            same host), ``"disk"`` (safetensors files), ``"gloo"`` (a process-group
            broadcast on CPU) or ``"nccl"`` (the same on GPU); ``None``
            picks the first of the kind's ``TRANSPORTS``: ``tensors`` in process, ``shm``
            for a server, ``disk`` for vllm/sglang.
        bucket_mb: the most tensor data (MiB) one transfer of a weight push carries; a push
            holds at most two buckets of extra memory on the sending side.
        server_args: extra arguments of the launched servers.
        python: the interpreter of the server's own venv (default: this one).
        urls: attach to these running servers instead of launching any.
        colocate: training and these engines share the devices: around each train step of the
            policy the replicas pause and give their device memory back (``offload_level``),
            then take back the weights, load the new ones, take back the KV cache and resume
            (``trainers/colocate.py``; vLLM needs ``--enable-sleep-mode``, SGLang
            ``--enable-memory-saver``; engines on CPU only pause).
        offload_level: 1 (weights kept in CPU memory) or 2 (dropped; the update reloads them).
        shared_head_tokens: ``in_process`` only: distinct prompts joining a decode step whose
            first ``shared_head_tokens`` tokens agree prefill their common head once
            (``LocalEngine(shared_head_tokens=)``, ``areal_agents.engines.shared_head``;
            log-probs change by float rounding only); 0 (default): off.

    Raises:
        ConfigError: unknown kind/transport/device, a transport the kind cannot use,
            ``nccl`` on CPU, server options on ``in_process``, ``replicas`` != ``len(urls)``,
            or ``bucket_mb`` not a positive number.

    Example:
        >>> InferencePlacement(kind="server").resolved_transport()
        'shm'
        >>> InferencePlacement(urls=("http://h:8000",))
        Traceback (most recent call last):
        ...
        areal_agents.errors.ConfigError: Policy.inference: urls, server_args and python are for kind='server', 'vllm' or 'sglang', not 'in_process'
    """

    kind: InferenceKind = "in_process"
    replicas: int = 1
    device: Device | None = None
    transport: Transport | None = None
    bucket_mb: float = 256.0
    server_args: dict[str, Any] = field(default_factory=dict, hash=False)
    python: str | None = None
    urls: tuple[str, ...] = ()
    colocate: bool = False
    offload_level: int = 1
    shared_head_tokens: int = 0

    def __post_init__(self) -> None:
        owner = "Policy.inference"
        if self.offload_level not in (1, 2) or isinstance(self.offload_level, bool):
            raise ConfigError(f"{owner}.offload_level must be 1 (weights kept in CPU memory) or "
                              f"2 (dropped), got {self.offload_level!r}")
        _choice(owner, "kind", self.kind, InferenceKind)
        _choice(owner, "device", self.device, Device)
        _choice(owner, "transport", self.transport, Transport)
        _positive(owner, "replicas", self.replicas)
        if (isinstance(self.shared_head_tokens, bool) or not isinstance(self.shared_head_tokens, int)
                or self.shared_head_tokens < 0):
            raise ConfigError(f"{owner}.shared_head_tokens must be an integer >= 0 (0: off), got "
                              f"{self.shared_head_tokens!r}")
        if self.shared_head_tokens and self.kind != "in_process":
            raise ConfigError(f"{owner}.shared_head_tokens is for kind='in_process' (a "
                              f"LocalEngine), not {self.kind!r}; remove it")
        if (isinstance(self.bucket_mb, bool) or not isinstance(self.bucket_mb, (int, float))
                or not self.bucket_mb > 0):
            raise ConfigError(f"{owner}.bucket_mb must be a number > 0 (MiB per weight "
                              f"transfer), got {self.bucket_mb!r}")
        object.__setattr__(self, "urls", tuple(self.urls))
        object.__setattr__(self, "server_args", dict(self.server_args))
        if self.kind == "in_process" and (self.urls or self.server_args or self.python):
            raise ConfigError(f"{owner}: urls, server_args and python are for kind='server', "
                              "'vllm' or 'sglang', not 'in_process'")
        if self.urls and self.replicas not in (1, len(self.urls)):
            raise ConfigError(f"{owner}: replicas={self.replicas} but {len(self.urls)} urls; "
                              "with urls there is one replica per URL (drop replicas)")
        if self.urls:
            object.__setattr__(self, "replicas", len(self.urls))
        allowed = TRANSPORTS[self.kind]
        if self.transport is not None and self.transport not in allowed:
            raise ConfigError(f"{owner}: kind={self.kind!r} cannot use transport="
                              f"{self.transport!r}; choose one of {list(allowed)} (or omit it)")
        if self.transport == "nccl" and self.device == "cpu":
            cpu = [t for t in allowed if t != "nccl"]
            raise ConfigError(f"{owner}: transport='nccl' needs device='cuda'; use one of "
                              f"{cpu} on CPU")

    @classmethod
    def of(cls, value: InferencePlacement | dict[str, Any] | str) -> InferencePlacement:
        """``value`` as an ``InferencePlacement``: a kind name (``"vllm"``) is the shorthand
        for ``InferencePlacement(kind="vllm")``; a dict gives its fields.

        Raises:
            ConfigError: unknown kind or fields, or an invalid combination.
        """
        if isinstance(value, str):
            return cls(kind=value)  # type: ignore[arg-type]  # checked in __post_init__
        return _coerce(cls, value, "Policy.inference")

    def resolved_transport(self) -> Transport:
        """``transport``, or the automatic choice for ``kind`` (see the class docstring)."""
        return self.transport if self.transport is not None else TRANSPORTS[self.kind][0]

    @property
    def bucket_bytes(self) -> int:
        """``bucket_mb`` in bytes (at least 1)."""
        return max(1, int(self.bucket_mb * 2**20))

    def resolved_device(self) -> str:
        """The device of in-process and server engines: ``device``, or ``"cuda"`` when CUDA
        is available and ``"cpu"`` otherwise.

        Raises:
            ConfigError: ``device="cuda"`` on a host where CUDA is not available.
        """
        import torch

        if self.device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("Policy.inference: device='cuda' but CUDA is not available on "
                              "this host (torch.cuda.is_available() is False); use "
                              "device='cpu' or omit device")
        return self.device
