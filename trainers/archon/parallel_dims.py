"""``ParallelDims``: the sizes of the Archon parallel dimensions and their device mesh."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from areal_agents.errors import ConfigError


@dataclass
class ParallelDims:
    """Sizes of the parallel dimensions; their product must equal the world size.

    Mesh layout (outer to inner): ``pp``, ``dp_shard``, ``tp`` — TP ranks are neighbours
    (fast links), pipeline stages the outermost. ``ep`` (expert parallel) reuses the
    ``dp_shard`` ranks: experts are split over them and tokens are exchanged with all-to-all.

    Args:
        dp_shard: FSDP2 sharding degree; ``-1`` takes what is left of the world size.
        tp: tensor-parallel degree (attention heads and MLP columns are split).
        pp: pipeline-parallel degree (layers are split into stages).
        ep: expert-parallel degree for MoE experts (1 or ``dp_shard``).
        world_size: defaults to the process group's size (1 without one).

    Raises:
        ConfigError: the sizes do not multiply to the world size or are < 1.

    Example:
        >>> ParallelDims(dp_shard=-1, tp=2, world_size=4).dp_shard
        2
    """

    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    world_size: int = 0
    _mesh: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.world_size <= 0:
            self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ParallelDims.{name} must be >= 1 (got {getattr(self, name)})")
        if self.dp_shard == -1:
            if self.world_size % (self.tp * self.pp):
                raise ConfigError(
                    f"world size {self.world_size} is not divisible by tp*pp={self.tp * self.pp}"
                )
            self.dp_shard = self.world_size // (self.tp * self.pp)
        if self.dp_shard < 1 or self.dp_shard * self.tp * self.pp != self.world_size:
            raise ConfigError(
                f"dp_shard*tp*pp = {self.dp_shard}*{self.tp}*{self.pp} must equal the world size "
                f"{self.world_size}; change the degrees or launch {self.dp_shard * self.tp * self.pp} processes"
            )
        if self.ep not in (1, self.dp_shard):
            raise ConfigError(f"ep must be 1 or dp_shard={self.dp_shard} (got {self.ep})")

    @property
    def dp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def build_mesh(self, device_type: str = "cpu"):
        """The ``DeviceMesh`` with dims ``("pp", "dp_shard", "tp")`` (created once).

        Raises:
            ConfigError: more than one rank is requested but no process group exists.
        """
        if self._mesh is None:
            if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
                raise ConfigError(
                    "ParallelDims with world size > 1 needs torch.distributed initialised "
                    "(init_process_group) before building the mesh"
                )
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(
                device_type, (self.pp, self.dp_shard, self.tp), mesh_dim_names=("pp", "dp_shard", "tp")
            )
        return self._mesh

    def local_rank(self, dim: str) -> int:
        """This process's coordinate along ``dim`` (0 without a process group)."""
        if self.world_size == 1:
            return 0
        return self.build_mesh()[dim].get_local_rank()


def default_device() -> torch.device:
    """``cuda:<current>`` when CUDA is available, else CPU."""
    return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
