"""Colocation: a policy's training and its inference engines take turns on the same devices.

With ``Policy.inference.colocate`` the train step of the policy is bracketed by its replicas
giving their device memory back (``Colocation``); without it nothing changes (``NoColocation``,
the null object ``train_policy`` calls unconditionally). One colocated step, per live replica::

    pause                          (in-flight requests wait; vLLM keep / SGLang retract)
    offload(level)                 vLLM  POST /sleep?level=L&mode=keep
                                   SGLang POST /release_memory_occupation
    ---- the train step runs on the freed devices ----
    onload(["weights"])            vLLM  POST /wake_up?tags=weights
                                   SGLang POST /resume_memory_occupation {"tags": ["weights"]}
    update_weights                 the new version (Gateway.update_weights: every replica)
    onload(["kv_cache"])           the KV cache last: it is the largest, and is needed only to
                                   generate
    resume                         the waiting requests continue on the new weights

Pausing first keeps the requests in flight: they wait (their KV cache is recomputed after the
offload) instead of failing. Weights come back before the KV cache, so the update loads into
resident memory without the KV cache competing for it (vLLM's advice for RL). If the train
step raises, every replica is brought back (``onload()``, ``resume``) before the error
propagates. A failed update still ends with every replica resumed, as ``Gateway.push_weights``.

Engines without ``offload``/``onload`` (``LocalEngine``, our own ``server``: CPU memory) are
paused and resumed only: generation stops during the train step, which is what sharing the
devices means, and there is no device memory to hand over (moving a CPU model's weights to
another place in CPU memory would only cost time).

Example:
    >>> colocation_for(InferencePlacement(colocate=True, offload_level=2)).level
    2
    >>> colocation_for(InferencePlacement())
    NoColocation()
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from areal_agents.engines.base import InferenceEngine, WeightUpdate

from .placement import InferencePlacement

__all__ = ["Colocation", "NoColocation", "Offloadable", "colocation_for"]

log = logging.getLogger(__name__)


@runtime_checkable
class Offloadable(Protocol):
    """An engine that can give its device memory back and take it again (``VLLMEngine``,
    ``SGLangEngine``)."""

    async def offload(self, level: int = 1) -> None:
        """Release the weights' and KV cache's device memory (1: weights kept in CPU memory,
        2: weights dropped). Call after ``pause``."""
        ...

    async def onload(self, tags: Sequence[str] | None = None) -> None:
        """Take back the memory of ``tags`` (``"weights"``, ``"kv_cache"``; None: all)."""
        ...


class NoColocation:
    """Training and inference on their own devices: the replicas serve during the train step
    and the weight push is ``Gateway.push_weights`` (pause -> update -> resume)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    async def before_train(self, gateway: Any, policy: str) -> None:
        """Nothing: the replicas keep serving."""

    async def after_failed_train(self, gateway: Any, policy: str) -> None:
        """Nothing to restore."""

    async def push(self, gateway: Any, policy: str, update: WeightUpdate) -> None:
        """``Gateway.push_weights``."""
        await gateway.push_weights(policy, update)


class Colocation(NoColocation):
    """A policy's replicas give their device memory back around its train step (module
    docstring: the exact order).

    Args:
        level: the offload level (1: weights to CPU memory, 2: dropped; vLLM's sleep level).

    Raises:
        ValueError: ``level`` not 1 or 2.
    """

    def __init__(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(f"offload level must be 1 (weights to CPU memory) or 2 (dropped), "
                             f"got {level!r}")
        self.level = level

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level})"

    @staticmethod
    def _engines(gateway: Any, policy: str) -> list[InferenceEngine]:
        return list(gateway.policies[policy].router.live_engines())

    async def before_train(self, gateway: Any, policy: str) -> None:
        """Pause every live replica, then offload each that can."""
        await gateway.pause(policy)
        for engine in self._engines(gateway, policy):
            if isinstance(engine, Offloadable):
                await engine.offload(self.level)

    async def after_failed_train(self, gateway: Any, policy: str) -> None:
        """Bring every replica back (all memory, then resume), the train step having raised."""
        try:
            for engine in self._engines(gateway, policy):
                if isinstance(engine, Offloadable):
                    await engine.onload()
        finally:
            await gateway.resume(policy)

    async def push(self, gateway: Any, policy: str, update: WeightUpdate) -> None:
        """Weights back -> update -> KV cache back -> resume (resumed also on failure)."""
        try:
            engines = self._engines(gateway, policy)
            for engine in engines:
                if isinstance(engine, Offloadable):
                    await engine.onload(["weights"])
            await gateway.update_weights(policy, update)
            for engine in engines:
                if isinstance(engine, Offloadable):
                    await engine.onload(["kv_cache"])
        finally:
            await gateway.resume(policy)


def colocation_for(placement: InferencePlacement) -> NoColocation:
    """``Colocation(placement.offload_level)`` when ``placement.colocate``, else
    ``NoColocation()``."""
    return Colocation(placement.offload_level) if placement.colocate else NoColocation()
