"""``AdapterEngine``: one LoRA adapter of a ``LocalEngine`` seen as an ``InferenceEngine``.

A router, gateway policy or trainer that holds an ``AdapterEngine`` sees a complete engine:
``generate`` runs with the adapter, ``pause``/``resume`` park and release only the adapter's
requests, ``update_weights`` loads only the adapter's tensors (PEFT names) and ``version`` is
the adapter's. Several views share one ``LocalEngine``: one base model in memory, every
adapter's requests decoded in the same continuous batch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .base import GenerateRequest, GenerateResult, InferenceEngine, WeightUpdate

if TYPE_CHECKING:
    from .local import LocalEngine

__all__ = ["AdapterEngine"]


class AdapterEngine(InferenceEngine):
    """The view of adapter ``name`` of ``engine`` (made by ``LocalEngine.add_adapter``).

    ``close`` closes nothing: the shared ``LocalEngine`` belongs to whoever built it.

    Example:
        >>> import asyncio
        >>> from areal_agents.engines import GenerateRequest, LocalEngine, SamplingParams
        >>> async def main():
        ...     async with LocalEngine("tiny") as engine:
        ...         speaker = engine.add_adapter("speaker", rank=2)
        ...         req = GenerateRequest([1, 20, 30], SamplingParams(max_tokens=2))
        ...         return (await speaker.generate(req)).outputs[0].versions
        >>> asyncio.run(main())[0]
        0
    """

    def __init__(self, engine: LocalEngine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.max_context = engine.max_context
        self.exact_logprobs = engine.exact_logprobs

    @property  # type: ignore[override]
    def version(self) -> int:
        return self.engine.adapter_version(self.name)

    @property
    def model(self) -> Any:
        """The shared base model (with every adapter's layers)."""
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Generate with this adapter (``request.adapter`` must be None or this name).

        Raises:
            ValueError: the request names another adapter.
        """
        if request.adapter not in (None, self.name):
            raise ValueError(f"request names adapter {request.adapter!r} but was sent to the "
                             f"view of adapter {self.name!r}")
        return await self.engine.generate(dataclasses.replace(request, adapter=self.name))

    async def pause(self) -> None:
        await self.engine.pause(adapter=self.name)

    async def resume(self) -> None:
        await self.engine.resume(adapter=self.name)

    async def update_weights(self, update: WeightUpdate) -> None:
        """Load this adapter's PEFT-named tensors; bumps only this adapter's version."""
        if update.adapter not in (None, self.name):
            raise ValueError(f"weight update for adapter {update.adapter!r} sent to the view "
                             f"of adapter {self.name!r}")
        await self.engine.update_weights(dataclasses.replace(update, adapter=self.name))

    @property
    def num_pending(self) -> int:
        return self.engine.pending(self.name)

    async def close(self) -> None:
        """Nothing to stop: the shared ``LocalEngine`` is closed by its owner."""
