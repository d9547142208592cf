"""``SGLangEngine``: an SGLang server, launched here or attached by URL, behind ``InferenceEngine``.

SGLang runs in its own virtual environment (GPU only: it has no CPU wheel) and is reached over
its native HTTP API; this module never imports sglang. ``docs/inference_servers.md`` has the
commands. Endpoints used, as defined in sgl-project/sglang
``python/sglang/srt/entrypoints/http_server.py`` with bodies from
``python/sglang/srt/managers/io_struct.py``:

* ``GET /health``, ``GET /get_model_info`` (``is_generation``, ``weight_version``),
  ``GET /v1/models`` (``max_model_len``);
* ``POST /generate`` (``sglang_protocol``);
* ``POST /pause_generation {"mode": "retract"}``: running requests go back to the waiting
  queue and none fails (their KV cache is recomputed on ``/continue_generation``, so the
  cache may be flushed by an update meanwhile; ``in_place`` would forbid that);
* ``POST /abort_request {"rid"}`` / ``{"abort_all": true}``;
* colocation: ``POST /release_memory_occupation {}`` / ``POST /resume_memory_occupation
  {"tags": ["weights"|"kv_cache"]}`` (``--enable-memory-saver``);
* ``POST /update_weights_from_disk`` (``model_path``, ``load_format``, ``weight_version``,
  ``flush_cache``, ``keep_pause``), ``/update_weights_from_tensor``
  (``serialized_named_tensors``: one payload per tensor-parallel rank),
  ``/init_weights_update_group`` and ``/update_weights_from_distributed`` (NCCL; GPU only),
  ``POST /update_weight_version {"new_version", "abort_all_requests": false}``.

An update while the server runs requests would wait for all of them (SGLang takes a writer
lock unless paused); ``update_weights`` pauses (retract), updates, and continues instead.

Versions: SGLang labels the weights with the ``weight_version`` string of each update; this
engine sets it to ``str(version)``. Responses carry the label at the time they finish, not per
token (unless the build sends ``weight_versions`` spans), so a completion gets the engine's
version at send time for every token: a request spanning an update is counted as the older
version (staleness over-, never under-estimated).

Log-probs: see ``sglang_protocol`` -- SGLang's are after temperature and before top-k/top-p;
this engine renormalises them over the filtered set. The server must not run with
``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (pre-temperature values); ``launch`` sets it to 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx2

from ..errors import ContextLengthExceeded, EngineError
from . import sglang_protocol as protocol
from .base import GenerateRequest, GenerateResult, OnTokens, WeightUpdate
from .http_engine import error_message
from .server_engine import ServerEngine
from .server_process import ServerProcess
from .sglang_weights import WeightsMixin

SGLANG_PYTHON_ENV = "AREAL_AGENTS_SGLANG_PYTHON"


class SGLangEngine(WeightsMixin, ServerEngine):
    """An SGLang server as an inference engine (token ids in; ids, log-probs, versions out).

    Build one with ``await SGLangEngine.launch(model_dir)`` (starts and owns a server) or
    ``await SGLangEngine.attach(url)``; the constructor takes everything explicitly.

    Args:
        url: base URL of the server, e.g. ``"http://127.0.0.1:30000"``.
        max_context: the server's context length.
        version: the weight version the server holds now.
        timeout_s: seconds one HTTP request may take (a whole generation included).
        transport: an ``httpx2`` transport (tests pass ``httpx2.MockTransport``).
        server: the ``ServerProcess`` this engine owns (stopped by ``close``).
        weights_dir: where ``update_weights(named_tensors=...)`` writes safetensors; the server
            must read the same path (default: a temporary directory removed by ``close``).
        top_p_window: top log-probs requested per token for top-p without top-k (the nucleus
            must fit in them; see ``sglang_protocol.filtered_logprobs``).

    Example:
        >>> async def main():  # doctest: +SKIP
        ...     async with await SGLangEngine.launch("runs/model", python=".venv-sglang/bin/python") as e:
        ...         out = await e.generate(GenerateRequest([1, 2, 3], SamplingParams(max_tokens=4)))
        ...         return out.outputs[0].token_ids
    """

    server_name = "SGLang server"
    python_env = SGLANG_PYTHON_ENV  # where launch finds the SGLang venv's interpreter
    server_package = "SGLang"
    server_module = "sglang.launch_server"

    def __init__(self, url: str, *, max_context: int, version: int = 0, timeout_s: float = 600.0,
                 transport: httpx2.AsyncBaseTransport | None = None,
                 server: ServerProcess | None = None, weights_dir: str | Path | None = None,
                 top_p_window: int = 128) -> None:
        super().__init__(url, timeout_s=timeout_s, server=server, transport=transport,
                         weights_dir=weights_dir)
        self.max_context = max_context
        self.version = version
        self.top_p_window = top_p_window
        self._in_flight: dict[str, int] = {}  # request id -> n (SGLang's rids: id or id_i)

    def _client(self, headers: dict[str, str] | None) -> httpx2.AsyncClient:
        # uvicorn in SGLang drops idle connections after 5 s, httpx after 5 s too: expire ours
        # first so a pooled connection is never closed under a request
        return httpx2.AsyncClient(base_url=self.url, transport=self._http_transport,
                                  timeout=self.timeout_s, headers=headers,
                                  limits=httpx2.Limits(keepalive_expiry=2.0))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    async def launch(cls, model: str | Path, *, python: str | None = None, port: int | None = None,
                     dtype: str = "auto", context_length: int | None = None,
                     mem_fraction_static: float | None = None, server_args: Sequence[str] = (),
                     env: dict[str, str] | None = None, log_path: str | Path | None = None,
                     startup_timeout_s: float = 900.0, timeout_s: float = 600.0,
                     progress: Callable[[str], None] | None = None,
                     top_p_window: int = 128,
                     weights_dir: str | Path | None = None) -> SGLangEngine:
        """Start ``python -m sglang.launch_server`` on ``127.0.0.1`` and attach.

        Args:
            model: a local HF model directory (config, safetensors, tokenizer).
            python: the interpreter of a venv with SGLang (default ``$AREAL_AGENTS_SGLANG_PYTHON``).
            port: TCP port (default: a free one).
            dtype, context_length, mem_fraction_static: SGLang's ``--dtype``,
                ``--context-length``, ``--mem-fraction-static``.
            server_args: more command-line arguments (``["--tp-size", "2"]``).
            env: more environment variables for the server.
            log_path: the server's log (default: a file in a new temporary directory).
            startup_timeout_s: seconds to wait for ``GET /health``.
            progress: receives a line every 15 s while waiting (default: stderr).
            top_p_window, weights_dir, timeout_s: see the class.

        Raises:
            ConfigError: no ``python`` and no ``$AREAL_AGENTS_SGLANG_PYTHON``.
            EngineError: the server exited during start-up (with its last log lines).
            EngineTimeout: not healthy within ``startup_timeout_s`` (the server is stopped).
        """
        args = ["--model-path", str(model), "--dtype", dtype]
        args += ["--context-length", str(context_length)] if context_length else []
        args += (["--mem-fraction-static", str(mem_fraction_static)]
                 if mem_fraction_static is not None else [])
        args += list(server_args)
        server, url = await cls._launch_server(
            args, python=python, port=port, log_path=log_path, progress=progress,
            env={"SGLANG_RETURN_ORIGINAL_LOGPROB": "0", **(env or {})},
            startup_timeout_s=startup_timeout_s)
        return await cls._attach_or_stop(server, cls.attach(
            url, timeout_s=timeout_s, server=server, top_p_window=top_p_window,
            weights_dir=weights_dir))

    @classmethod
    async def attach(cls, url: str, *, max_context: int | None = None, timeout_s: float = 600.0,
                     transport: httpx2.AsyncBaseTransport | None = None,
                     server: ServerProcess | None = None, weights_dir: str | Path | None = None,
                     top_p_window: int = 128) -> SGLangEngine:
        """An engine for the running server at ``url`` (not stopped by ``close`` unless
        ``server`` is given).

        Reads the context length from ``/v1/models`` (unless ``max_context`` is given) and the
        version from the server's weight label (a label that is not an integer, like SGLang's
        initial ``"default"``, is set to ``"0"``).

        Raises:
            EngineError: the server cannot be reached, serves no generation model, or reports
                no context length (pass ``max_context``).
        """
        engine = cls(url, max_context=max_context or 0, timeout_s=timeout_s, transport=transport,
                     server=server, weights_dir=weights_dir, top_p_window=top_p_window)
        try:
            await engine._discover(max_context)
        except BaseException:
            await engine._http.aclose()
            raise
        return engine

    async def _discover(self, max_context: int | None) -> None:
        info = await self._request("GET", "/get_model_info")
        if not info.get("is_generation", True):
            raise EngineError(f"the SGLang server at {self.url} serves {info.get('model_path')!r}"
                              ", which is not a generation model")
        if max_context is None:
            served = (await self._request("GET", "/v1/models")).get("data") or [{}]
            if not served[0].get("max_model_len"):
                raise EngineError(f"the SGLang server at {self.url} reports no max_model_len in "
                                  "/v1/models; pass SGLangEngine.attach(max_context=...)")
            self.max_context = int(served[0]["max_model_len"])
        label = str(info.get("weight_version"))
        if label.lstrip("-").isdigit():
            self.version = int(label)
        else:
            await self._request("POST", "/update_weight_version",
                                {"new_version": str(self.version), "abort_all_requests": False})

    # -- InferenceEngine ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Generate ``request.sampling.n`` completions on the server.

        Raises:
            ContextLengthExceeded: ``len(prompt_ids) + max_tokens > max_context``.
            EngineTimeout: no answer within ``timeout_s``.
            EngineUnavailable: the server refuses connections or its process has exited.
            EngineError: empty prompt, engine closed, the server failed the request, or its
                log-probs cannot be brought to this project's definition (see the module).
        """
        return await self._generate(request, None)

    async def generate_streaming(self, request: GenerateRequest,
                                 on_tokens: OnTokens) -> GenerateResult:
        """``generate`` streamed from the server (``/generate`` with ``"stream": true``):
        ``on_tokens`` gets each completion's new tokens as SGLang sends them
        (``sglang_protocol.StreamedOutputs``; either streaming mode of the server).

        The deltas of a completion concatenate to its returned ids, log-probs and versions
        (the version at send time; a build that sends ``weight_versions`` spans sets the
        returned ones from them). Cancelling the caller closes the stream and SGLang aborts
        the request. ``timeout_s`` bounds each wait for an event.

        Raises:
            As ``generate``; an error event mid-stream is an ``EngineError``.
        """
        return await self._generate(request, on_tokens)

    async def _generate(self, request: GenerateRequest,
                        on_tokens: OnTokens | None) -> GenerateResult:
        self._check_request(request)
        sent_at_version = self.version
        self._pending += 1
        self._in_flight[request.request_id] = request.sampling.n
        try:
            if on_tokens is None:
                data = await self._request("POST", "/generate",
                                           protocol.generate_body(request, self.top_p_window))
            else:
                streamed = protocol.StreamedOutputs(request.sampling, sent_at_version)
                body = protocol.generate_body(request, self.top_p_window, stream=True)
                async with contextlib.aclosing(self._stream("/generate", body)) as items:
                    async for item in items:  # a bad event closes the stream (SGLang aborts)
                        delta = streamed.add(item)
                        if delta is not None:
                            on_tokens(delta)
        finally:
            self._pending -= 1
            self._in_flight.pop(request.request_id, None)
        if on_tokens is not None:
            return GenerateResult(request.request_id, list(request.prompt_ids),
                                  streamed.outputs())
        outputs = [protocol.parse_output(item, request.sampling, sent_at_version)
                   for item in protocol.outputs(data, request.sampling.n)]
        return GenerateResult(request.request_id, list(request.prompt_ids), outputs)

    async def pause(self) -> None:
        """``POST /pause_generation {"mode": "retract"}``: running requests wait in the queue
        (none fails). Idempotent."""
        await self._request("POST", "/pause_generation", {"mode": "retract"})
        self._paused = True

    async def resume(self) -> None:
        """``POST /continue_generation``: waiting requests continue. Idempotent."""
        await self._request("POST", "/continue_generation", {})
        self._paused = False

    async def offload(self, level: int = 1) -> None:
        """``POST /release_memory_occupation {}``: give the GPU memory of the weights and the
        KV cache back (colocation, ``trainers/colocate.py``; SGLang has no levels: the weights
        are kept in CPU memory only with ``--enable-weights-cpu-backup``, else the next update
        reloads them all). Needs a server launched with ``--enable-memory-saver``; pause first
        (retracted requests are recomputed after ``onload``).

        Raises:
            EngineError: the server refused (e.g. started without ``--enable-memory-saver``).
        """
        del level
        try:
            await self._request("POST", "/release_memory_occupation", {})
        except EngineError as exc:
            raise EngineError(f"{exc}; colocation needs an SGLang server launched with "
                              "--enable-memory-saver") from exc

    async def onload(self, tags: Sequence[str] | None = None) -> None:
        """``POST /resume_memory_occupation {"tags": [...]}``: take back the memory of ``tags``
        (``"weights"``, ``"kv_cache"``; None: all released)."""
        await self._request("POST", "/resume_memory_occupation",
                            {"tags": list(tags)} if tags is not None else {})

    async def abort(self, request_ids: Iterable[str] | None = None) -> None:
        """Abort these requests (None: all); they return with ``finish_reason="abort"``.

        SGLang names the ``n > 1`` samples of request ``r`` ``r_0``, ``r_1``...; those of a
        request in flight here are aborted one by one.
        """
        if request_ids is None:
            await self._request("POST", "/abort_request", {"rid": "", "abort_all": True})
            return
        for rid in request_ids:
            n = self._in_flight.get(rid, 1)
            for sglang_rid in [rid] if n == 1 else [f"{rid}_{i}" for i in range(n)]:
                await self._request("POST", "/abort_request", {"rid": sglang_rid})

    async def update_weights(self, update: WeightUpdate) -> None:
        """Load HF-named tensors or a safetensors directory (``update_weights_from_disk``).

        Tensors are written to this engine's weights directory first (the server must read
        the same file system). Pauses unless already paused, so in-flight requests wait
        instead of finishing first; tokens generated afterwards carry the new version.

        Raises:
            EngineError: the server refused the update (its message, e.g. an unknown name).
        """
        if update.path is not None:
            await self.update_weights_from_disk(os.path.abspath(update.path),
                                                version=update.version)
            return
        assert update.named_tensors is not None
        folder = await self._write(update.named_tensors, uuid.uuid4().hex)
        try:  # the version is taken under the update lock (concurrent updates get distinct ones)
            await self.update_weights_from_disk(folder, version=update.version)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def _updating(self, path: str, body: dict[str, Any], version: int | None,
                        during: Callable[[], Awaitable[None]] | None = None) -> None:
        """Pause (unless paused), ``POST path`` with ``weight_version``, set the version,
        continue what was paused here; ``during`` runs while the request is in flight."""
        async with self._update_lock:
            target = version if version is not None else self.version + 1
            async with self._paused_for_update():
                sent = asyncio.ensure_future(self._request(
                    "POST", path, {**body, "weight_version": str(target)}))
                if during is not None:  # whichever fails first raises (a refused update
                    helper = asyncio.ensure_future(during())  # must not wait on a sender)
                    done, _ = await asyncio.wait({sent, helper},
                                                 return_when=asyncio.FIRST_EXCEPTION)
                    for task in done:
                        if task.exception() is not None:
                            (helper if task is sent else sent).cancel()
                            task.result()  # raises its exception
                    await helper
                await sent
                self.version = target

    # -- responses ----------------------------------------------------------------------------

    def _http_error(self, response: httpx2.Response, what: str) -> Exception:
        message = error_message(response)
        if response.status_code == 400 and "context length" in message:
            return ContextLengthExceeded(f"SGLang refused {what}: {message}")
        return super()._http_error(response, what)
