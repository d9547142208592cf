"""Gateway.push_weights (pause -> update -> resume) with replicas that fail (AReaL#1160)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from areal_agents.engines.base import WeightUpdate
from areal_agents.errors import EngineError
from areal_agents.gateway import Gateway
from areal_agents.models import tiny_tokenizer
from areal_agents.testing.engine import ScriptedEngine


class Probe(ScriptedEngine):
    """A scripted replica that can fail its pause or its update (after reading some tensors)
    and whose pause can take a few event-loop turns."""

    def __init__(self, *, fail_pause: bool = False, fail_after: int | None = None,
                 slow_pause: bool = False) -> None:
        super().__init__()
        self.fail_pause, self.fail_after, self.slow_pause = fail_pause, fail_after, slow_pause
        self.loaded: list[str] = []

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    async def pause(self) -> None:
        if self.fail_pause:
            raise EngineError("pause refused")
        if self.slow_pause:  # still in flight when a sibling's pause has failed
            for _ in range(10):
                await asyncio.sleep(0)
        await super().pause()

    async def update_weights(self, update: WeightUpdate) -> None:
        staged = []
        for name, _ in update.named_tensors:
            if self.fail_after is not None and len(staged) == self.fail_after:
                raise EngineError(f"update refused after {len(staged)} tensors")
            staged.append(name)
        self.loaded = staged
        self.version = update.version


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def weights() -> list[tuple[str, torch.Tensor]]:
    return [(f"w{i}", torch.full((4,), float(i))) for i in range(4)]


async def test_a_failed_pause_resumes_every_replica_and_raises(tok):
    # fails on the old push_weights (pause outside the try, gather not waiting for the slow
    # pause): the slow replica stayed paused forever
    engines = [Probe(slow_pause=True), Probe(fail_pause=True), Probe()]
    gw = Gateway()
    gw.add_policy("p", engines, tok)
    with pytest.raises(EngineError, match="pause refused"):
        await gw.push_weights("p", WeightUpdate(named_tensors=iter(weights()), version=1))
    for _ in range(20):  # let any pause still in flight land
        await asyncio.sleep(0)
    assert [e.paused for e in engines] == [False, False, False]
    assert [e.version for e in engines] == [0, 0, 0]  # nothing was loaded
    assert [e.loaded for e in engines] == [[], [], []]


async def test_a_replica_failing_mid_update_leaves_none_paused(tok):
    engines = [Probe(), Probe(fail_after=2), Probe()]
    gw = Gateway()
    gw.add_policy("p", engines, tok)
    with pytest.raises(EngineError, match="update refused after 2 tensors"):
        await gw.push_weights("p", WeightUpdate(named_tensors=iter(weights()), version=1))
    assert [e.paused for e in engines] == [False, False, False]
    # replicas load in order: the first holds the new version, the failed one and the rest
    # keep theirs (it discarded its partial update); the caller retries or stops the run
    assert [e.version for e in engines] == [1, 0, 0]
    assert [len(e.loaded) for e in engines] == [4, 0, 0]
    engines[1].fail_after = None
    await gw.push_weights("p", WeightUpdate(named_tensors=iter(weights()), version=2))
    assert [e.version for e in engines] == [2, 2, 2]
    assert [e.paused for e in engines] == [False, False, False]
