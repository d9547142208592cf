"""``launcher: ray``: the Trainer's worker groups and engine servers placed by Ray.

The controller code is the same as with the default launcher (``LocalLauncher``: processes on
this machine); ``RayLauncher`` changes only where processes run:

=====================  ==========================================================================
a training group       ``TrainPlacement.world_size`` ranks as Ray actors in one placement group
(``world_size > 1``)   of one bundle per device (``{"GPU": 1}`` on cuda, ``{"CPU":
                       cpus_per_worker}`` on cpu), strategy ``STRICT_PACK`` (one node); the
                       rendezvous is rank 0's node and a port free there (``ray_groups.py``)
inference replicas     ``kind: server`` replicas as engine servers inside Ray actors, one
                       ``SPREAD`` placement group of ``replicas`` bundles (``ray_replicas.py``);
                       other kinds are built as without Ray
auto-scaling           per policy in ``autoscale``: ``min_replicas``/``max_replicas`` and the
                       queue rule of ``trainers/autoscale.py``; a sampler measures each policy's
                       queue depth every ``interval_s``, and at each step end the replica count is
                       brought to the rule's target (``autoscale_scaler.py``): joins get the
                       current weights and version first, removals are drained first, lost
                       replicas are replaced; events are logged as ``autoscale/<policy>/...``
=====================  ==========================================================================

``address`` is ``"auto"`` (join the running cluster: ``RAY_ADDRESS`` if set, else the one
``ray start --head`` made on this node), a ``ray://`` or ``host:port`` address, or ``None``
(start a new local Ray instance with ``num_cpus`` / ``num_gpus``, also where a cluster runs,
stopped on ``close``). The same in Python (``RayLauncher(address="auto")``,
``Trainer(launcher="ray")``) and YAML (``launcher: {kind: ray, address: auto}``); joining
leaves the cluster running on ``close``. See docs/scaling.md, "Several nodes with Ray".

Example:
    >>> RayLauncher.of({"kind": "ray", "address": None, "num_cpus": 2}).num_cpus
    2
    >>> resolve_launcher("local")
    LocalLauncher()
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from areal_agents.errors import ConfigError

from .autoscale import AutoscaleSettings
from .autoscale_scaler import ReplicaScaler
from .placement import InferencePlacement, TrainPlacement

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["LocalLauncher", "RayLauncher", "resolve_launcher", "train_bundles"]

log = logging.getLogger(__name__)


def train_bundles(train: TrainPlacement, cpus_per_worker: float) -> list[dict[str, float]]:
    """One bundle per rank: a GPU on cuda, ``cpus_per_worker`` CPUs on cpu.

    Example:
        >>> train_bundles(TrainPlacement(world_size=2, device="cuda"), 1.0)
        [{'GPU': 1.0}, {'GPU': 1.0}]
    """
    device = train.device or "cpu"  # no CUDA probing here: the cluster's nodes decide
    one = {"GPU": 1.0} if device == "cuda" else {"CPU": float(cpus_per_worker)}
    return [dict(one) for _ in range(train.world_size)]


class LocalLauncher:
    """The default: worker groups and servers are processes of this machine (no Ray)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def group_factory(self, name: str, train: TrainPlacement) -> Any:
        """The worker-group class of policy ``name`` (None: ``DistributedEngineGroup``)."""
        return None

    async def build_engines(self, name: str, placement: InferencePlacement, model: Any,
                            tokenizer: Any, run_dir: Path | None, max_batch_size: int, *,
                            write_model: Callable[[Path], None] | None = None
                            ) -> list[Any] | None:
        """Policy ``name``'s replicas, or None: ``serving.build_engines`` builds them
        (``write_model`` as there: writes the served weights when ``model`` is a skeleton)."""
        return None

    async def attach(self, trainer: Trainer) -> None:
        """Start what runs beside training (nothing here)."""

    async def on_step_end(self, trainer: Trainer) -> None:
        """Between two steps: bring replica counts to their targets (nothing here)."""

    async def close(self) -> None:
        """Release what the launcher holds (nothing here)."""


@dataclass
class RayLauncher(LocalLauncher):
    """Place worker groups and engine servers with Ray (module docstring).

    Args:
        address: ``"auto"`` (the running cluster), a cluster address, or None (a local Ray
            instance started here and stopped on ``close``).
        num_cpus, num_gpus: the local instance's resources (None: Ray detects them; a
            number of GPUs may be logical, e.g. to test placement on a CPU host).
        cpus_per_worker: CPUs of one CPU bundle (a training rank or a replica).
        autoscale: policy name -> ``AutoscaleSettings`` (or a dict of its fields); a policy
            named here must serve ``kind: server`` replicas.
        namespace: the Ray namespace of this run's actors.
        placement_timeout_s: seconds a placement group may wait for its resources.

    Raises:
        ConfigError: unknown fields, or invalid autoscale settings; later, no cluster at
            ``address`` or a placement group the cluster cannot hold in time.
    """

    address: str | None = "auto"
    num_cpus: int | None = None
    num_gpus: int | None = None
    cpus_per_worker: float = 1.0
    autoscale: dict[str, Any] = field(default_factory=dict)
    namespace: str = "areal_agents"
    placement_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        self.autoscale = {p: AutoscaleSettings.of(s, p) for p, s in self.autoscale.items()}
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"launcher.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        self._started = False
        self._replicas: dict[str, Any] = {}  # policy -> RayReplicaSet
        self._scalers: dict[str, ReplicaScaler] = {}
        self._groups: list[Any] = []  # placement groups made here

    @classmethod
    def of(cls, value: dict[str, Any]) -> RayLauncher:
        """The launcher a config's ``launcher:`` mapping describes (``kind: ray``).

        Raises:
            ConfigError: unknown fields (named, with the known ones) or invalid values.
        """
        known = {f.name for f in fields(cls)}
        extra = sorted(set(value) - known - {"kind"})
        if extra:
            raise ConfigError(f"launcher: unknown field(s) {extra}; known: {sorted(known)}")
        return cls(**{k: v for k, v in value.items() if k != "kind"})

    def _init(self) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("launcher: ray needs Ray; pip install 'areal-agents[ray]'") from None
        if ray.is_initialized():
            return
        from .ray_actors import JOB_RUNTIME_ENV

        kwargs: dict[str, Any] = {"namespace": self.namespace, "include_dashboard": False,
                                  "log_to_driver": False, "runtime_env": JOB_RUNTIME_ENV}
        if self.address is None:  # "local": a new instance even where a cluster runs
            kwargs.update(num_cpus=self.num_cpus, num_gpus=self.num_gpus)
            self._started = True
        try:
            ray.init(address=self.address or "local", **kwargs)
        except ConnectionError as exc:
            raise ConfigError(f"launcher: no Ray cluster at address={self.address!r} ({exc}); "
                              "start one with `ray start --head` on this node, or set address: "
                              "null for a local Ray instance. A cluster with token "
                              "authentication also needs RAY_AUTH_MODE=token and its token "
                              "here (~/.ray/auth_token or RAY_AUTH_TOKEN)") from None

    def _placement_group(self, bundles: list[dict[str, float]], strategy: str) -> Any:
        import ray
        from ray.util.placement_group import placement_group

        group = placement_group(bundles, strategy=strategy)
        self._groups.append(group)
        try:
            ray.get(group.ready(), timeout=self.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(
                f"launcher: Ray could not place {len(bundles)} bundles of {bundles[0]} "
                f"({strategy}) within {self.placement_timeout_s} s; the cluster has "
                f"{ray.available_resources()} available. Add nodes, lower world_size/replicas "
                "or cpus_per_worker") from None
        return group

    def group_factory(self, name: str, train: TrainPlacement) -> Any:
        from .ray_groups import RayEngineGroup

        self._init()
        bundles = train_bundles(train, self.cpus_per_worker)
        group = self._placement_group(bundles, "STRICT_PACK")
        return functools.partial(RayEngineGroup, placement_group=group, bundle=bundles[0])

    async def build_engines(self, name: str, placement: InferencePlacement, model: Any,
                            tokenizer: Any, run_dir: Path | None, max_batch_size: int, *,
                            write_model: Callable[[Path], None] | None = None
                            ) -> list[Any] | None:
        if placement.kind != "server" or placement.urls:
            if name in self.autoscale:
                raise ConfigError(f"launcher.autoscale.{name}: auto-scaling needs "
                                  f"inference.kind='server' without urls, got "
                                  f"{placement.kind!r}")
            return None
        from .ray_replicas import RayReplicaSet

        self._init()  # in the event loop's thread: Ray wants the main thread for its handlers
        args = placement.server_args
        settings = self.autoscale.get(name)
        count = max(placement.replicas, settings.min_replicas if settings else 1)
        bundle = {"CPU": float(self.cpus_per_worker)}
        group = await asyncio.to_thread(self._placement_group, [bundle] * count, "SPREAD")
        replicas = RayReplicaSet(
            await _save_model(name, model, tokenizer, run_dir, write_model), bundle,
            transport=placement.resolved_transport(), bucket_bytes=placement.bucket_bytes,
            timeout_s=args.get("timeout_s", 600.0), threads=args.get("threads", 1),
            max_batch_size=args.get("max_batch_size", max_batch_size),
            startup_timeout_s=args.get("startup_timeout_s", 300.0), python=placement.python,
            placement_group=group, num_bundles=count)
        self._replicas[name] = replicas
        engines = []
        try:
            for _ in range(count):
                engines.append(await replicas.start())
        except BaseException:
            for engine in engines:
                await replicas.stop(engine)
            raise
        return engines

    async def attach(self, trainer: Trainer) -> None:
        """Start each auto-scaled policy's queue sampler."""
        for name, settings in self.autoscale.items():
            if name not in self._replicas:
                raise ConfigError(f"launcher.autoscale.{name}: no policy {name!r} with "
                                  f"kind='server' replicas; policies: {sorted(trainer.policies)}")
            if name not in trainer.train_engines:
                raise ConfigError(f"launcher.autoscale.{name}: auto-scaling joins replicas at the "
                                  "trained weights (Trainer.add_replica); policy "
                                  f"{name!r} is frozen; remove it from autoscale")
            self._scalers[name] = scaler = ReplicaScaler(
                name, trainer.gateway.policies[name].router, self._replicas[name], settings,
                join=functools.partial(trainer.add_replica, name),
                log=lambda metrics: trainer.logger.log(trainer.step, metrics))
            scaler.start_sampling()

    async def on_step_end(self, trainer: Trainer) -> None:
        for scaler in self._scalers.values():
            await scaler.reconcile()

    async def close(self) -> None:
        """Stop the samplers, the replicas' actors and placement groups; stop Ray when it was
        started here (idempotent)."""
        for scaler in self._scalers.values():
            await scaler.stop_sampling()
        self._scalers.clear()
        for replicas in self._replicas.values():
            replicas.close()
        self._replicas.clear()
        try:
            import ray
        except ImportError:
            return
        if not ray.is_initialized():
            return
        for group in self._groups:
            ray.util.remove_placement_group(group)
        self._groups.clear()
        if self._started:
            ray.shutdown()
            self._started = False


async def _save_model(name: str, model: Any, tokenizer: Any, run_dir: Path | None,
                      write_model: Callable[[Path], None] | None) -> Path:
    """``save_pretrained`` the served copy where the replicas load it (``run_dir`` must be on
    storage every node reads; a temporary directory without one)."""
    import tempfile

    root = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="serving-"))
    model_dir = root / "serving" / name
    model_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(write_model or model.save_pretrained, model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def resolve_launcher(value: str | dict[str, Any] | LocalLauncher | None) -> LocalLauncher:
    """``Trainer(launcher=...)``: ``"local"`` (default), ``"ray"`` (``address="auto"``), a
    mapping with ``kind: ray`` and ``RayLauncher`` fields, or a launcher object.

    Raises:
        ConfigError: an unknown kind (the choices are named).
    """
    if value is None or value == "local":
        return LocalLauncher()
    if isinstance(value, LocalLauncher):
        return value
    if value == "ray":
        return RayLauncher()
    if isinstance(value, dict) and value.get("kind", "ray") == "ray":
        return RayLauncher.of(value)
    if isinstance(value, dict) and value.get("kind") == "local" and len(value) == 1:
        return LocalLauncher()
    raise ConfigError(f"launcher={value!r}; use 'local', 'ray' or {{kind: ray, address: ..., "
                      "autoscale: {...}}")
