"""``VLLMEngine``: a vLLM server, launched here or attached by URL, behind ``InferenceEngine``.

vLLM runs in its own virtual environment (its pins conflict with ours) and is reached over
HTTP only; this module never imports vllm. ``docs/inference_servers.md`` has the commands.

Endpoints used (vLLM 0.32, ``VLLM_SERVER_DEV_MODE=1``):

* generation: ``POST /inference/v1/generate`` (token ids in and out, per-token weight-version
  spans; needs ``--enable-scale-out``, which ``launch`` passes), or ``POST /v1/completions``
  with a token-id prompt on servers started without it;
* ``POST /pause?mode=keep`` / ``POST /resume``: in-flight requests freeze and continue;
* colocation: ``POST /sleep?level=1|2&mode=keep`` / ``POST /wake_up?tags=weights&tags=kv_cache``
  (``--enable-sleep-mode``);
* ``POST /abort_requests``; ``GET /weight_info``; ``POST /update_weight_version``;
* weights: ``POST /collective_rpc`` ``reload_weights(weights_path=DIR)`` (HF-named
  safetensors on a file system the server reads), then ``POST /reset_prefix_cache`` (cached
  prefixes hold keys/values of the old weights) and a new version label;
* weights on GPU by NCCL (``init_weight_transfer`` once, then ``update_weights_nccl``):
  ``POST /init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights`` (while
  the trainer broadcasts), ``/finish_weight_update`` (bodies: ``vllm_weights.nccl_*``).

Tied embeddings: updates of a tied model always carry ``lm_head.weight`` (vLLM 0.32's
reload would leave the old head otherwise; ``vllm_weights``).

Log-probs: ``launch`` starts the server with ``--logprobs-mode processed_logprobs``, vLLM's
name for this project's definition (``areal_agents.engines.sampling``: after temperature,
top-k and top-p). A server attached by URL must have been started with it too.

Versions: the server labels the weights (``/update_weight_version``) with ``str(version)``
and reports, per completion, which label produced which output tokens, so a request that
spans an update records both versions exactly. ``/v1/completions`` does not report labels:
there every token gets the version the engine had when the request was sent (the older
one when an update happens meanwhile; staleness is then over-, never under-estimated).

Streaming (``generate_streaming``): the same endpoints with ``"stream": true`` send each
decode step's tokens and log-probs as a chunk; the spans come with the last chunk only, so a
delta carries the engine's version when it arrived and the returned output the server's
spans (``vllm_protocol.StreamedChoices``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx2

from ..errors import ConfigError, ContextLengthExceeded, EngineError, WeightSyncError
from . import vllm_protocol as protocol
from .base import CompletionOutput, GenerateRequest, GenerateResult, OnTokens, WeightUpdate
from .http_engine import error_message
from .server_engine import ServerEngine
from .server_process import ServerProcess
from .vllm_lora import (
    BASE_SLOT,
    BASE_WITH_HEAD_LORA,
    RUNTIME_LORA_ENV,
    VLLMAdapterEngine,
    lora_server_args,
    server_lora_slots,
)
from .vllm_lora_slots import LoRASlots, parse_lora_ids, served_lora_slots
from .vllm_weights import (
    missing_head,
    nccl_init_info,
    nccl_update_info,
    ties_embeddings,
    with_head,
    write_tensors,
)

VLLM_PYTHON_ENV = "AREAL_AGENTS_VLLM_PYTHON"
Endpoint = Literal["generate", "completions"]


class VLLMEngine(ServerEngine):
    """A vLLM server as an inference engine (token ids in; ids, log-probs, versions out).

    Build one with ``await VLLMEngine.launch(model_dir)`` (starts and owns a server) or
    ``await VLLMEngine.attach(url)`` (a running server); the constructor takes everything
    explicitly and checks nothing.

    Args:
        url: base URL of the server, e.g. ``"http://127.0.0.1:8000"``.
        model: the served model name (``GET /v1/models``).
        max_context: the server's ``max_model_len``.
        endpoint: ``"generate"`` (exact per-token versions) or ``"completions"``.
        version: the weight version the server holds now.
        timeout_s: seconds one HTTP request may take (a whole generation included).
        transport: an ``httpx2`` transport (tests pass ``httpx2.MockTransport``).
        server: the ``ServerProcess`` this engine owns (stopped by ``close``).
        weights_dir: where ``update_weights(named_tensors=...)`` writes safetensors; the server
            must read the same path (default: a temporary directory removed by ``close``).
        tie_word_embeddings: the model ties ``lm_head`` to ``embed_tokens`` (updates then
            always carry ``lm_head.weight``; see the module docstring).
        lora_slots: the server's ``--max-loras`` when known (``launch`` sets it, ``attach``
            reads it from the server): loads that would fill its last slot, kept empty for
            the base (``vllm_lora.BASE_SLOT``), are refused, and the base is served next to
            lm_head adapters. None: unknown.

    Example:
        >>> async def main():  # doctest: +SKIP
        ...     async with await VLLMEngine.launch("runs/model", python=".venv-vllm/bin/python") as e:
        ...         out = await e.generate(GenerateRequest([1, 2, 3], SamplingParams(max_tokens=4)))
        ...         return out.outputs[0].token_ids
    """

    server_name = "vLLM server"
    python_env = VLLM_PYTHON_ENV  # where launch finds the vLLM venv's interpreter
    server_package = "vLLM"
    server_module = "vllm.entrypoints.openai.api_server"

    def __init__(self, url: str, *, model: str, max_context: int, endpoint: Endpoint = "generate",
                 version: int = 0, timeout_s: float = 600.0,
                 transport: httpx2.AsyncBaseTransport | None = None,
                 server: ServerProcess | None = None, weights_dir: str | Path | None = None,
                 tie_word_embeddings: bool = False, lora_slots: int | None = None) -> None:
        super().__init__(url, timeout_s=timeout_s, server=server, transport=transport,
                         weights_dir=weights_dir)
        self.model = model
        self.max_context = max_context
        self.endpoint = endpoint
        self.version = version
        self.tie_word_embeddings = tie_word_embeddings
        self.adapters: dict[str, VLLMAdapterEngine] = {}
        self.lora = LoRASlots(lora_slots, base_slot=BASE_SLOT)  # names loaded on the server

    # -- construction -------------------------------------------------------------------------

    @classmethod
    async def launch(cls, model: str | Path, *, python: str | None = None, port: int | None = None,
                     dtype: str = "float32", max_model_len: int | None = None,
                     kv_cache_gib: int = 1, enforce_eager: bool = True,
                     chunked_prefill: bool = False, max_loras: int = 0, max_lora_rank: int = 16,
                     server_args: Sequence[str] = (),
                     env: dict[str, str] | None = None,
                     log_path: str | Path | None = None, startup_timeout_s: float = 900.0,
                     timeout_s: float = 600.0,
                     progress: Callable[[str], None] | None = None) -> VLLMEngine:
        """Start ``python -m vllm.entrypoints.openai.api_server`` on ``127.0.0.1`` and attach.

        Args:
            model: a local HF model directory (config, safetensors, tokenizer).
            python: the interpreter of a venv with vLLM (default ``$AREAL_AGENTS_VLLM_PYTHON``).
            port: TCP port (default: a free one).
            dtype, max_model_len: vLLM's ``--dtype`` / ``--max-model-len``.
            kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache on a CPU build).
            enforce_eager: ``--enforce-eager`` (no CUDA graphs: faster start; turn off on GPUs).
            chunked_prefill: vLLM's chunked prefill (off: ``--no-enable-chunked-prefill``).
                Off by default because vllm-cpu 0.32's engine core dies (``RuntimeError: CPU
                Generator does not use offset``) when the prefill of a request with a seed is
                split over steps, i.e. when more than ``max_num_batched_tokens`` (2048) prompt
                tokens arrive at once; turn it on on GPUs.
            max_loras: LoRA adapters served at once (``add_adapter``); 0: no LoRA. Passes
                ``--enable-lora --max-loras 2N+1 --max-lora-rank R`` (two slots an adapter:
                its version and the previous one while requests sent under it finish, and
                one kept empty for the base: ``vllm_lora.server_lora_slots``) and sets
                ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` (adapters are loaded at run time).
            max_lora_rank: the largest adapter rank the server accepts (rounded up to a
                rank vLLM takes, ``vllm_lora.SERVER_LORA_RANKS``).
            server_args: more command-line arguments (``["--max-num-seqs", "16"]``).
            env: more environment variables for the server.
            log_path: the server's log (default: a file in a new temporary directory).
            startup_timeout_s: seconds to wait for ``GET /health``.
            progress: receives a line every 15 s while waiting (default: stderr).

        Raises:
            ConfigError: no ``python`` and no ``$AREAL_AGENTS_VLLM_PYTHON``.
            EngineError: the server exited during start-up (with its last log lines).
            EngineTimeout: not healthy within ``startup_timeout_s`` (the server is stopped).
        """
        args = ["--model", str(model), "--dtype", dtype,
                "--logprobs-mode", "processed_logprobs", "--enable-scale-out",
                "--generation-config", "vllm"]  # no sampling defaults from the model's config
        args += ["--max-model-len", str(max_model_len)] if max_model_len else []
        args += ["--enforce-eager"] if enforce_eager else []
        args += [] if chunked_prefill else ["--no-enable-chunked-prefill"]
        args += lora_server_args(max_loras, max_lora_rank)
        args += list(server_args)
        server_env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
                      **({RUNTIME_LORA_ENV: "True"} if max_loras else {}), **(env or {})}
        server, url = await cls._launch_server(
            args, python=python, port=port, env=server_env, log_path=log_path,
            startup_timeout_s=startup_timeout_s, progress=progress)
        return await cls._attach_or_stop(server, cls.attach(
            url, timeout_s=timeout_s, server=server, tie_word_embeddings=ties_embeddings(model),
            lora_slots=server_lora_slots(max_loras) if max_loras else None))

    @classmethod
    async def attach(cls, url: str, *, model: str | None = None, timeout_s: float = 600.0,
                     transport: httpx2.AsyncBaseTransport | None = None,
                     server: ServerProcess | None = None,
                     weights_dir: str | Path | None = None,
                     tie_word_embeddings: bool | None = None,
                     lora_slots: int | None = None) -> VLLMEngine:
        """An engine for the running server at ``url`` (not stopped by ``close``).

        Reads the model name and context from ``/v1/models``, picks ``/inference/v1/generate``
        when the server enables it, and takes the version from the server's weight label (a
        label that is not an integer, like vLLM's initial ``"default"``, is set to ``"0"``).
        ``tie_word_embeddings=None`` reads it from the served model's ``config.json`` when that
        directory exists on this machine (else False). ``lora_slots``: the server's
        ``--max-loras``; None reads it from ``GET /server_info`` (``served_lora_slots``), and
        stays unknown if the server does not report it (see ``__init__``).

        Raises:
            EngineError: the server cannot be reached, serves no (or not that) model, or runs
                without ``VLLM_SERVER_DEV_MODE=1``.
        """
        engine = cls(url, model=model or "", max_context=0, timeout_s=timeout_s,
                     transport=transport, server=server, weights_dir=weights_dir,
                     lora_slots=lora_slots)
        try:
            await engine._discover(model)
            if lora_slots is None:
                info = await engine._http.get("/server_info", params={"config_format": "json"})
                with contextlib.suppress(ValueError):  # not JSON: the count stays unknown
                    engine.lora.slots = served_lora_slots(info.json())
        except BaseException:
            await engine._http.aclose()
            raise
        engine.tie_word_embeddings = (ties_embeddings(engine.model) if tie_word_embeddings is None
                                      else tie_word_embeddings)
        return engine

    async def _discover(self, model: str | None) -> None:
        served = (await self._request("GET", "/v1/models")).get("data") or []
        names = [m.get("id") for m in served]
        chosen = [m for m in served if model in (None, m.get("id"))]
        if not chosen:
            raise EngineError(f"the vLLM server at {self.url} serves {names}, not {model!r}")
        self.model, self.max_context = chosen[0]["id"], int(chosen[0]["max_model_len"])
        probe = await self._http.post("/inference/v1/generate", json={})
        self.endpoint = "completions" if probe.status_code in (403, 404) else "generate"
        info = await self._http.get("/weight_info")
        if info.status_code == 404:
            raise EngineError(f"the vLLM server at {self.url} has no /weight_info: start it with "
                              "VLLM_SERVER_DEV_MODE=1 (pause, resume and weight updates need it)")
        label = str(self._decode(info, "GET /weight_info").get("weight_version"))
        if label.lstrip("-").isdigit():
            self.version = int(label)
        else:
            await self._request("POST", "/update_weight_version", {"new_version": str(self.version)})

    # -- InferenceEngine ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Generate ``request.sampling.n`` completions on the server.

        Raises:
            ContextLengthExceeded: ``len(prompt_ids) + max_tokens > max_context``.
            EngineTimeout: no answer within ``timeout_s``.
            EngineUnavailable: the server refuses connections or its process has exited.
            EngineError: empty prompt, engine closed, the server failed the request, or
                adapters with an lm_head LoRA are loaded on a server whose slot count is
                unknown (``vllm_lora.BASE_WITH_HEAD_LORA``).
        """
        return await self._generate(request, self.model)

    async def generate_streaming(self, request: GenerateRequest,
                                 on_tokens: OnTokens) -> GenerateResult:
        """``generate`` streamed from the server (``"stream": true``): ``on_tokens`` gets
        each completion's new tokens as the server sends them (one decode step a chunk).

        The deltas of a completion concatenate to its returned token ids and log-probs. Their
        versions are the engine's version when each chunk arrives (``/v1/completions``: the
        version at send time, as ``generate``); the returned versions are the server's exact
        spans (``vllm_protocol.StreamedChoices``). Cancelling the caller closes the stream and
        vLLM aborts the request. ``timeout_s`` bounds each wait for a chunk.

        Raises:
            As ``generate``; an error the server reports mid-stream is an ``EngineError``.
        """
        return await self._generate(request, self.model, on_tokens=on_tokens)

    async def _generate(self, request: GenerateRequest, model: str,
                        adapter_version: int | None = None,
                        on_tokens: OnTokens | None = None) -> GenerateResult:
        """``generate`` with ``model`` (the base or a loaded LoRA adapter's name); with
        ``adapter_version`` every token gets that version (the server's labels are the base's);
        with ``on_tokens``, streamed (``generate_streaming``)."""
        self._check_request(request)
        if model == self.model:
            self._check_base_servable()
        sent_at_version = self.version if adapter_version is None else adapter_version
        self._pending += 1
        try:
            sampling = self._sampling(request)
            if on_tokens is not None:
                outputs = await self._streamed(request, model, sampling, adapter_version,
                                               on_tokens)
            elif self.endpoint == "generate" and adapter_version is None:
                data = await self._request("POST", "/inference/v1/generate",
                                           protocol.generate_body(request, model, sampling))
                outputs = [protocol.parse_generate_choice(c, request.sampling.top_logprobs,
                                                          self.version)
                           for c in protocol.choices(data)]
            elif self.endpoint == "generate":  # an adapter: its version, not the base's labels
                data = await self._request("POST", "/inference/v1/generate",
                                           protocol.generate_body(request, model, sampling))
                outputs = [dataclasses.replace(out, versions=[sent_at_version] * len(out.token_ids))
                           for out in (protocol.parse_generate_choice(
                               c, request.sampling.top_logprobs, sent_at_version)
                               for c in protocol.choices(data))]
            else:
                data = await self._request("POST", "/v1/completions", protocol.completions_body(
                    request, model, sampling))
                outputs = [protocol.parse_completions_choice(c, sent_at_version)
                           for c in protocol.choices(data)]
        finally:
            self._pending -= 1
        return GenerateResult(request.request_id, list(request.prompt_ids), outputs)

    async def _streamed(self, request: GenerateRequest, model: str, sampling: dict[str, Any],
                        adapter_version: int | None, on_tokens: OnTokens
                        ) -> list[CompletionOutput]:
        """The completions of ``request`` streamed from the server, handing ``on_tokens``
        each chunk's new tokens (``generate_streaming``)."""
        sent_at_version = self.version if adapter_version is None else adapter_version
        if self.endpoint == "generate":
            path, body = "/inference/v1/generate", protocol.generate_body(request, model,
                                                                          sampling)
        else:
            path, body = "/v1/completions", protocol.completions_body(request, model, sampling)
        labelled = self.endpoint == "generate" and adapter_version is None
        choices = protocol.StreamedChoices(request.sampling.n, self.endpoint,
                                           request.sampling.top_logprobs, spans=labelled)
        async with contextlib.aclosing(self._stream(path, protocol.streamed(body))) as chunks:
            async for chunk in chunks:  # a bad chunk closes the stream (vLLM aborts) at once
                for delta in choices.add(chunk, self.version if labelled else sent_at_version):
                    on_tokens(delta)
        return choices.outputs()

    async def pause(self) -> None:
        """``POST /pause?mode=keep``: in-flight requests freeze (none fail). Idempotent."""
        await self._request("POST", "/pause", params={"mode": "keep"})
        self._paused = True

    async def resume(self) -> None:
        """``POST /resume``: frozen and queued requests continue. Idempotent."""
        await self._request("POST", "/resume")
        self._paused = False

    async def offload(self, level: int = 1) -> None:
        """``POST /sleep?level=L&mode=keep``: give the GPU memory back (colocation,
        ``trainers/colocate.py``). Level 1 moves the weights to CPU memory, level 2 drops them
        (the next update reloads them all); both drop the KV cache, and requests in flight are
        preempted, recomputed after ``onload``. Needs a server launched with
        ``--enable-sleep-mode`` (CUDA).

        Raises:
            EngineError: the server refused (e.g. started without ``--enable-sleep-mode``).
        """
        try:
            await self._request("POST", "/sleep", params={"level": str(level), "mode": "keep"})
        except EngineError as exc:
            raise EngineError(f"{exc}; colocation needs a vLLM server launched with "
                              "--enable-sleep-mode (server_args: [--enable-sleep-mode])") from exc

    async def onload(self, tags: Sequence[str] | None = None) -> None:
        """``POST /wake_up?tags=...``: take back the memory of ``tags`` (``"weights"``,
        ``"kv_cache"``; None: all). vLLM resumes scheduling by itself once all is back."""
        query = "&".join(f"tags={t}" for t in tags or ())
        await self._request("POST", f"/wake_up?{query}" if query else "/wake_up")

    async def abort(self, request_ids: Iterable[str] | None = None) -> None:
        """Abort these requests (None: all); they return with ``finish_reason="abort"``."""
        if request_ids is not None and not (request_ids := list(request_ids)):
            return
        prefix = "generate-tokens-" if self.endpoint == "generate" else "cmpl-"  # vLLM's ids
        ids = [prefix + i for i in request_ids] if request_ids is not None else []
        await self._request("POST", "/abort_requests", {"request_ids": ids} if ids else {})

    async def update_weights(self, update: WeightUpdate) -> None:
        """Reload weights from HF-named tensors or a safetensors directory; set the version.

        Pauses (keeping in-flight requests) unless already paused, reloads, drops the prefix
        cache, labels the server with the new version, and resumes what it paused; tokens
        generated afterwards carry the new version.

        Raises:
            EngineError: the server refused the reload (e.g. a name or shape it does not know).
        """
        async with self._update_lock:
            target = update.version if update.version is not None else self.version + 1
            folder = self._new_folder(f"v{target}")
            if update.path is not None:
                path, written = os.path.abspath(update.path), None
                if self.tie_word_embeddings and await asyncio.to_thread(missing_head, path):
                    path = written = await asyncio.to_thread(with_head, path, folder)
            else:
                assert update.named_tensors is not None
                path = written = await asyncio.to_thread(
                    write_tensors, update.named_tensors, folder, tied=self.tie_word_embeddings)
            try:
                async with self._paused_for_update():
                    await self._request("POST", "/collective_rpc", {
                        "method": "reload_weights", "kwargs": {"weights_path": path}})
                    await self._serve_version(target)
            finally:
                if written is not None:
                    shutil.rmtree(written, ignore_errors=True)

    async def init_weight_transfer(self, master_address: str, master_port: int,
                                   world_size: int, *, rank_offset: int = 1,
                                   packed: bool = False) -> None:
        """``POST /init_weight_transfer_engine``: the server's workers join the trainer's NCCL
        group (ranks from ``rank_offset``; the trainer, rank 0, joins concurrently with vLLM's
        ``NCCLTrainerWeightTransferEngine``). GPU only.

        Raises:
            ValueError: an impossible ``rank_offset`` / ``world_size``.
            EngineError: the server could not join (its message).
        """
        info = nccl_init_info(master_address, master_port, world_size,
                              rank_offset=rank_offset, packed=packed)
        await self._request("POST", "/init_weight_transfer_engine", {"init_info": info})

    async def update_weights_nccl(self, names: Sequence[str], dtype_names: Sequence[str],
                                  shapes: Sequence[Sequence[int]], *,
                                  broadcast: Callable[[], Any],
                                  version: int | None = None) -> None:
        """One NCCL update: pause (keep) -> ``/start_weight_update`` -> ``/update_weights``
        while ``broadcast()`` (the trainer's blocking sends, run in a thread) sends the tensors
        in ``names`` order -> ``/finish_weight_update`` -> drop the prefix cache -> version
        label -> resume.

        Raises:
            WeightSyncError: the broadcast or a weight-transfer call failed; the server's
                weights may be partly updated (push a full update, e.g. from disk); the
                engine keeps its version and is resumed.
        """
        body = {"update_info": nccl_update_info(names, dtype_names, shapes)}
        async with self._update_lock:
            target = version if version is not None else self.version + 1
            async with self._paused_for_update():
                await self._request("POST", "/start_weight_update")
                calls = {asyncio.ensure_future(asyncio.to_thread(broadcast)),
                         asyncio.ensure_future(self._request("POST", "/update_weights", body,
                                                             retry=False))}
                done, pending = await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION)
                for call in pending:  # the other side failed: do not wait on a stuck peer
                    call.add_done_callback(lambda c: c.cancelled() or c.exception())
                    call.cancel()
                failed = next((c.exception() for c in done if c.exception()), None)
                if failed is not None:
                    raise WeightSyncError(f"the NCCL weight update to version {target} failed "
                                          f"({failed!r}); the server may hold part of it: "
                                          "push a full update (e.g. from disk)") from failed
                await self._request("POST", "/finish_weight_update")
                await self._serve_version(target)

    def add_adapter(self, name: str, *, rank: int = 8, alpha: float = 16.0,
                    target_modules: Sequence[str] | None = None) -> VLLMAdapterEngine:
        """Serve LoRA adapter ``name`` of the base model (the server needs ``max_loras``);
        returns its ``InferenceEngine`` view (``engines.vllm_lora``). Until its first
        ``update_weights`` the adapter is the base model (``B = 0``).

        Raises:
            ConfigError: the name is taken.
            EngineError: the server's slots (when known) cannot serve one more adapter
                (``LoRASlots.check_adapters``).
        """
        if name in self.adapters:
            raise ConfigError(f"adapter {name!r} already exists; adapters: {sorted(self.adapters)}")
        self.lora.check_adapters(len(self.adapters) + 1, self.url)
        self.adapters[name] = VLLMAdapterEngine(self, name, rank=rank, alpha=alpha,
                                                target_modules=target_modules)
        return self.adapters[name]

    def _check_base_servable(self) -> None:
        """Refuse a request for the base next to loaded lm_head adapters on a server whose
        last slot is not known to stay empty (``vllm_lora``'s ``BASE_WITH_HEAD_LORA``: vLLM
        would answer it with an adapter's head)."""
        heads = sorted(n for n, a in self.adapters.items() if a.adapts_head)
        if heads and not self.lora.spare_kept:
            raise EngineError(BASE_WITH_HEAD_LORA.format(names=heads))

    async def load_lora_adapter(self, name: str, path: str | Path) -> None:
        """``POST /v1/load_lora_adapter``: the server serves adapter ``name`` (a new name,
        not in place) from the PEFT directory ``path``; its worker id is learnt for
        ``unload_lora_adapter`` (``vllm_lora_slots``). First the adapters unloaded here
        that the worker took back for a request still running under them are removed again
        (``LoRASlots.leftovers``).

        Raises:
            EngineError: the server refused (its message; e.g. LoRA not enabled), or its
                usable slots are full (``LoRASlots.check_room``).
        """
        async with self.lora.lock:
            before = await self._lora_worker_ids()
            for lora_id in self.lora.leftovers(before) if before is not None else ():
                await self._request("POST", "/collective_rpc",
                                    {"method": "remove_lora", "args": [lora_id]})
            if before is not None:
                self.lora.see(before)
            self.lora.check_room(name, self.url)
            await self._lora_call("/v1/load_lora_adapter",
                                  {"lora_name": name, "lora_path": str(path)})
            after = await self._lora_worker_ids()
            new = after - before if after is not None and before is not None else set()
            # vLLM numbers a new name one above every id before it: the largest new id is
            # ours (another may be an old adapter the worker took back for a running request)
            self.lora.add(name, max(new, default=None), Path(path))

    async def unload_lora_adapter(self, name: str) -> None:
        """``POST /v1/unload_lora_adapter``, then the worker's ``remove_lora`` (the unload
        alone leaves the adapter in its slot); a name the server no longer knows is done.

        Raises:
            EngineError: the server refused (the name stays, to be unloaded again).
        """
        async with self.lora.lock:
            lora_id = self.lora.ids[name]
            try:
                await self._lora_call("/v1/unload_lora_adapter", {"lora_name": name})
            except EngineError as exc:
                if "cannot be found" not in str(exc):
                    raise
            if lora_id is not None:
                await self._request("POST", "/collective_rpc",
                                    {"method": "remove_lora", "args": [lora_id]})
            self.lora.discard(name)

    async def _lora_call(self, path: str, body: dict[str, Any]) -> None:
        """POST a LoRA endpoint (vLLM answers with plain text, not JSON)."""
        what = f"POST {path}"
        response = await self._send("POST", path, body, None, what, self.retry_transport_errors)
        if response.status_code >= 400:
            raise self._http_error(response, what)

    async def _lora_worker_ids(self) -> set[int] | None:
        """The worker's loaded adapter ids (``list_loras``); None if it does not say (then the
        adapter loaded next stays in its slot after its unload)."""
        try:
            data = await self._request("POST", "/collective_rpc", {"method": "list_loras"})
        except EngineError:
            return None
        return parse_lora_ids(data.get("results") or [] if isinstance(data, dict) else [])

    async def _serve_version(self, target: int) -> None:
        """After new weights are in: drop the KV prefix cache computed with the old ones (also
        of running requests), label the server's weights ``target`` and take it as ours."""
        await self._request("POST", "/reset_prefix_cache",
                            params={"reset_running_requests": "true"})
        await self._request("POST", "/update_weight_version", {"new_version": str(target)})
        self.version = target

    # -- requests and responses ---------------------------------------------------------------

    @staticmethod
    def _sampling(request: GenerateRequest) -> dict[str, Any]:
        return protocol.sampling_params(request.sampling)

    def _http_error(self, response: httpx2.Response, what: str) -> Exception:
        message = error_message(response)
        if response.status_code == 400 and "max_model_len" in message:
            return ContextLengthExceeded(f"vLLM refused {what}: {message}")
        return super()._http_error(response, what)
