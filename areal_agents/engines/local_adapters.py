"""LoRA adapters served by a ``LocalEngine``: its adapter half (``LocalAdapterServing``) and
the per-adapter ``InferenceEngine`` view (``AdapterEngine``).

``LocalAdapterServing`` is the part of ``LocalEngine`` that knows about adapters: adding them,
per-adapter versions and weight loads, and parking the rows of a paused adapter (their
keys/values kept) and putting them back on ``resume``. ``LocalEngine`` inherits it; the
scheduling loop calls ``_park``/``_unpark`` once per step and ``_rows`` around every forward.

A router, gateway policy or trainer that holds an ``AdapterEngine`` sees a complete engine:
``generate`` runs with the adapter, ``pause``/``resume`` park and release only the adapter's
requests, ``update_weights`` loads only the adapter's tensors (PEFT names) and ``version`` is
the adapter's. Several views share one ``LocalEngine``: one base model in memory, every
adapter's requests decoded in the same continuous batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EngineError
from .base import GenerateRequest, GenerateResult, InferenceEngine, OnTokens, WeightUpdate
from .local_weights import read_tensors
from .lora import AdapterSpec, LoRAAdapters
from .scheduler import RunningBatch, prefill_cached

if TYPE_CHECKING:
    from .local import LocalEngine, _Job, _Seq

__all__ = ["AdapterEngine", "LocalAdapterServing"]


class LocalAdapterServing:
    """The LoRA-adapter half of ``LocalEngine`` (a mixin: ``LocalEngine`` is its only user).

    It reads and writes the engine's scheduling state, declared below; ``LocalEngine.__init__``
    creates every attribute. Versions: ``version`` is the base's, ``_adapter_versions[name]``
    each adapter's; a token's version is its row's (``_version_of``).
    """

    model: torch.nn.Module
    device: torch.device
    version: int
    _lora: LoRAAdapters | None
    _adapter_versions: dict[str, int]
    _paused_adapters: set[str]
    _waiting: deque[_Job]
    _running: list[_Seq]
    _parked: list[_Seq]
    _batch: RunningBatch
    _step_lock: asyncio.Lock | None

    if TYPE_CHECKING:  # LocalEngine's
        def _join(self, seqs: list[_Seq], prefilled: tuple) -> None: ...
        def _drop_finished(self) -> list[_Job]: ...

    def add_adapter(self, name: str, *, rank: int = 8, alpha: float = 16.0,
                    target_modules: list[str] | None = None) -> InferenceEngine:
        """Serve LoRA adapter ``name`` of the base model (zeros: equal to the base until its
        first ``update_weights``); returns its ``InferenceEngine`` view.

        Raises:
            ConfigError: the name is taken or ``target_modules`` matches no linear layer.
        """
        if self._lora is None:
            self._lora = LoRAAdapters(self.model)
        spec = AdapterSpec(rank, alpha) if target_modules is None else AdapterSpec(
            rank, alpha, list(target_modules))
        self._lora.add(name, spec)
        self._adapter_versions[name] = 0
        return self.adapter(name)

    def adapter(self, name: str) -> InferenceEngine:
        """The ``InferenceEngine`` view of adapter ``name`` (``generate``, ``pause``,
        ``update_weights`` and ``version`` act on that adapter only)."""
        from .local_adapters import AdapterEngine

        self._adapter_spec(name)
        return AdapterEngine(self, name)

    @property
    def adapters(self) -> list[str]:
        """Names of the served LoRA adapters."""
        return [] if self._lora is None else self._lora.names

    def adapter_version(self, name: str) -> int:
        """Weight version of adapter ``name``."""
        self._adapter_spec(name)
        return self._adapter_versions[name]

    def pending(self, adapter: str | None) -> int:
        """Requests of ``adapter`` (None: the base) queued, running or parked."""
        jobs = {id(s.job) for s in self._running + self._parked if s.adapter == adapter}
        return sum(1 for j in self._waiting if j.request.adapter == adapter) + len(jobs)

    def _adapter_spec(self, name: str) -> AdapterSpec:
        if self._lora is None or name not in self._lora.specs:
            raise EngineError(f"LocalEngine serves no adapter {name!r}; adapters: "
                              f"{self.adapters} (add one with add_adapter)")
        return self._lora.specs[name]

    async def _update_adapter(self, update: WeightUpdate) -> None:
        name = update.adapter
        assert name is not None and self._lora is not None
        self._adapter_spec(name)
        tensors = read_tensors(update)
        if self._step_lock is None:
            self._lora.load(name, tensors.items())
        else:
            async with self._between_steps():
                await asyncio.to_thread(self._lora.load, name, tensors.items())
        # prefix-cache entries carry the adapter version, so older ones simply miss
        current = self._adapter_versions[name]
        self._adapter_versions[name] = update.version if update.version is not None else current + 1

    # -- in the decode step (worker thread) --------------------------------------------------

    def _rows(self, adapters: list[str | None]) -> contextlib.AbstractContextManager:
        """Row ``i`` of the next forward uses LoRA adapter ``adapters[i]`` (None: the base)."""
        if self._lora is None:
            return contextlib.nullcontext()
        return self._lora.rows(adapters)

    def _version_of(self, adapter: str | None) -> int:
        return self.version if adapter is None else self._adapter_versions[adapter]

    def _park(self) -> None:
        """Take the rows of paused adapters out of the batch, keeping their keys/values."""
        rows = [i for i, s in enumerate(self._running)
                if s.adapter in self._paused_adapters and s.finish_reason is None]
        if not rows:
            return
        for row in rows:
            seq = self._running[row]
            seq.parked_kv = self._batch.row_kv(row)
            self._parked.append(seq)
        keep = [i for i in range(len(self._running)) if i not in set(rows)]
        self._running = [self._running[i] for i in keep]
        self._batch.keep(keep)

    def _unpark(self) -> list[_Job]:
        """Put parked rows of resumed adapters back: feed each row's last sampled token after
        its kept keys/values and sample its next token. Returns jobs finished by it."""
        back = [s for s in self._parked if s.adapter not in self._paused_adapters]
        if not back:
            return []
        self._parked = [s for s in self._parked if s not in back]
        live = [s for s in back if not s.job.future.done()]  # callers that gave up: dropped
        if live:
            kvs = [s.parked_kv for s in live]
            with self._rows([s.adapter for s in live]):
                prefilled = prefill_cached(self.model, kvs, [[s.token_ids[-1]] for s in live],
                                           [1] * len(live), self.device)
            for seq in live:
                seq.parked_kv = None
            self._join(live, prefilled)
        return self._drop_finished()





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
        self._check_adapter(request)
        return await self.engine.generate(dataclasses.replace(request, adapter=self.name))

    def _check_adapter(self, request: GenerateRequest) -> None:
        if request.adapter not in (None, self.name):
            raise ValueError(f"request names adapter {request.adapter!r} but was sent to the "
                             f"view of adapter {self.name!r}")

    async def generate_streaming(self, request: GenerateRequest,
                                 on_tokens: OnTokens) -> GenerateResult:
        """``generate``, streaming as ``LocalEngine.generate_streaming`` does."""
        self._check_adapter(request)
        return await self.engine.generate_streaming(
            dataclasses.replace(request, adapter=self.name), on_tokens)

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
