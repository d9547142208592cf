"""``VLLMEngine``: a vLLM server, launched here or attached by URL, behind ``InferenceEngine``.

vLLM runs in its own virtual environment (its pins conflict with ours) and is reached over
HTTP only; this module never imports vllm. ``docs/inference_servers.md`` has the commands.

Endpoints used (vLLM 0.32, ``VLLM_SERVER_DEV_MODE=1``):

* generation: ``POST /inference/v1/generate`` (token ids in and out, per-token weight-version
  spans; needs ``--enable-scale-out``, which ``launch`` passes), or ``POST /v1/completions``
  with a token-id prompt on servers started without it;
* ``POST /pause?mode=keep`` / ``POST /resume``: in-flight requests freeze and continue;
* ``POST /abort_requests``; ``GET /weight_info``; ``POST /update_weight_version``;
* weights: ``POST /collective_rpc`` ``reload_weights(weights_path=DIR)`` (HF-named
  safetensors on a file system the server reads), then ``POST /reset_prefix_cache`` (cached
  prefixes hold keys/values of the old weights) and a new version label.

Tied embeddings: vLLM 0.32's in-place reload unties ``lm_head`` from ``embed_tokens`` (the
head keeps its old values unless ``lm_head.weight`` is in the files). HF exports and
``save_pretrained`` omit that name for tied models, so for a model whose config ties them the
engine adds ``lm_head.weight`` (a copy of ``model.embed_tokens.weight``) to every update.

Log-probs: ``launch`` starts the server with ``--logprobs-mode processed_logprobs``, vLLM's
name for this project's definition (``areal_agents.engines.sampling``: after temperature,
top-k and top-p). A server attached by URL must have been started with it too.

Versions: the server labels the weights (``/update_weight_version``) with ``str(version)``
and reports, per completion, which label produced which output tokens, so a request that
spans an update records both versions exactly. ``/v1/completions`` does not report labels:
there every token gets the version the engine had when the request was sent (the older
one when an update happens meanwhile; staleness is then over-, never under-estimated).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import httpx2

from ..errors import (
    ConfigError,
    ContextLengthExceeded,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
)
from .base import CompletionOutput, GenerateRequest, GenerateResult, InferenceEngine, WeightUpdate
from .server_process import ServerProcess, free_port

VLLM_PYTHON_ENV = "AREAL_AGENTS_VLLM_PYTHON"
Endpoint = Literal["generate", "completions"]
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"  # the tied pair (HF names)


class VLLMEngine(InferenceEngine):
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

    Example:
        >>> async def main():  # doctest: +SKIP
        ...     async with await VLLMEngine.launch("runs/model", python=".venv-vllm/bin/python") as e:
        ...         out = await e.generate(GenerateRequest([1, 2, 3], SamplingParams(max_tokens=4)))
        ...         return out.outputs[0].token_ids
    """

    def __init__(self, url: str, *, model: str, max_context: int, endpoint: Endpoint = "generate",
                 version: int = 0, timeout_s: float = 600.0,
                 transport: httpx2.AsyncBaseTransport | None = None,
                 server: ServerProcess | None = None, weights_dir: str | Path | None = None,
                 tie_word_embeddings: bool = False) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.max_context = max_context
        self.endpoint = endpoint
        self.version = version
        self.timeout_s = timeout_s
        self.server = server
        self._http = httpx2.AsyncClient(base_url=self.url, transport=transport, timeout=timeout_s)
        self._own_weights_dir = weights_dir is None
        self._weights_dir = Path(weights_dir) if weights_dir else None
        self._pending = 0
        self._paused = False
        self._closed = False
        self._update_lock = asyncio.Lock()
        self.tie_word_embeddings = tie_word_embeddings

    # -- construction -------------------------------------------------------------------------

    @classmethod
    async def launch(cls, model: str | Path, *, python: str | None = None, port: int | None = None,
                     dtype: str = "float32", max_model_len: int | None = None,
                     kv_cache_gib: int = 1, enforce_eager: bool = True,
                     server_args: Sequence[str] = (), env: dict[str, str] | None = None,
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
        python = python or os.environ.get(VLLM_PYTHON_ENV)
        if not python:
            raise ConfigError(f"VLLMEngine.launch needs python= (a venv's interpreter with vLLM)"
                              f" or ${VLLM_PYTHON_ENV}; see docs/inference_servers.md")
        port = port or free_port()
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
                "--logprobs-mode", "processed_logprobs", "--enable-scale-out",
                "--generation-config", "vllm"]  # no sampling defaults from the model's config
        argv += ["--max-model-len", str(max_model_len)] if max_model_len else []
        argv += ["--enforce-eager"] if enforce_eager else []
        argv += list(server_args)
        server_env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
                      **(env or {})}
        log_path = log_path or Path(tempfile.mkdtemp(prefix="vllm-")) / "server.log"
        server = ServerProcess(argv, log_path, env=server_env, name="vLLM server")
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx2.AsyncClient() as probe:
                await server.wait_healthy(
                    probe, f"{url}/health", timeout_s=startup_timeout_s,
                    progress=progress or partial(print, file=sys.stderr, flush=True))
            return await cls.attach(url, timeout_s=timeout_s, server=server,
                                    tie_word_embeddings=ties_embeddings(model))
        except BaseException:
            server.stop()
            raise

    @classmethod
    async def attach(cls, url: str, *, model: str | None = None, timeout_s: float = 600.0,
                     transport: httpx2.AsyncBaseTransport | None = None,
                     server: ServerProcess | None = None,
                     weights_dir: str | Path | None = None,
                     tie_word_embeddings: bool | None = None) -> VLLMEngine:
        """An engine for the running server at ``url`` (not stopped by ``close``).

        Reads the model name and context from ``/v1/models``, picks ``/inference/v1/generate``
        when the server enables it, and takes the version from the server's weight label (a
        label that is not an integer, like vLLM's initial ``"default"``, is set to ``"0"``).
        ``tie_word_embeddings=None`` reads it from the served model's ``config.json`` when that
        directory exists on this machine (else False).

        Raises:
            EngineError: the server cannot be reached, serves no (or not that) model, or runs
                without ``VLLM_SERVER_DEV_MODE=1``.
        """
        engine = cls(url, model=model or "", max_context=0, timeout_s=timeout_s,
                     transport=transport, server=server, weights_dir=weights_dir)
        try:
            await engine._discover(model)
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
        label = str(self._json(info, "GET /weight_info").get("weight_version"))
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
            EngineError: empty prompt, engine closed, the server failed the request.
        """
        self._check(request)
        sent_at_version = self.version
        self._pending += 1
        try:
            if self.endpoint == "generate":
                data = await self._request("POST", "/inference/v1/generate",
                                           self._generate_body(request))
                outputs = [self._parse_choice(c, request) for c in _choices(data)]
            else:
                data = await self._request("POST", "/v1/completions",
                                           self._completions_body(request))
                outputs = [self._parse_completion(c, request, sent_at_version)
                           for c in _choices(data)]
        finally:
            self._pending -= 1
        return GenerateResult(request.request_id, list(request.prompt_ids), outputs)

    async def pause(self) -> None:
        """``POST /pause?mode=keep``: in-flight requests freeze (none fail). Idempotent."""
        await self._request("POST", "/pause", params={"mode": "keep"})
        self._paused = True

    async def resume(self) -> None:
        """``POST /resume``: frozen and queued requests continue. Idempotent."""
        await self._request("POST", "/resume")
        self._paused = False

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
            if update.path is not None:
                path, written = os.path.abspath(update.path), None
                if self.tie_word_embeddings and _missing_head(path):
                    path = written = await asyncio.to_thread(self._tie_head, path, f"v{target}")
            else:
                assert update.named_tensors is not None
                path = written = await asyncio.to_thread(
                    self._write_tensors, update.named_tensors, f"v{target}")
            paused_here = not self._paused
            if paused_here:
                await self.pause()
            try:
                await self._request("POST", "/collective_rpc", {
                    "method": "reload_weights", "kwargs": {"weights_path": path}})
                await self._request("POST", "/reset_prefix_cache",
                                    params={"reset_running_requests": "true"})
                await self._request("POST", "/update_weight_version",
                                    {"new_version": str(target)})
                self.version = target
            finally:
                if paused_here:
                    await self.resume()
                if written is not None:
                    shutil.rmtree(written, ignore_errors=True)

    @property
    def num_pending(self) -> int:
        return self._pending

    async def close(self) -> None:
        """Close the HTTP client, stop a launched server, remove own weight files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._http.aclose()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        if self._own_weights_dir and self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)

    # -- requests and responses ---------------------------------------------------------------

    def _check(self, request: GenerateRequest) -> None:
        if self._closed:
            raise EngineError("VLLMEngine is closed; create a new engine")
        ids, sp = request.prompt_ids, request.sampling
        if not ids:
            raise EngineError("empty prompt: prompt_ids must hold at least one token id")
        if len(ids) + sp.max_tokens > self.max_context:
            raise ContextLengthExceeded(
                f"prompt of {len(ids)} tokens + max_tokens {sp.max_tokens} = "
                f"{len(ids) + sp.max_tokens} exceeds the context window of {self.max_context} "
                "tokens; shorten the prompt or lower max_tokens")

    @staticmethod
    def _sampling(request: GenerateRequest) -> dict[str, Any]:
        sp = request.sampling
        greedy = sp.temperature == 0  # our greedy ignores top-k/top-p (temperature-1 log-probs)
        return {
            "n": sp.n, "max_tokens": sp.max_tokens, "temperature": sp.temperature,
            "top_p": 1.0 if greedy else sp.top_p, "top_k": 0 if greedy else sp.top_k,
            "seed": sp.seed, "stop": list(sp.stop), "stop_token_ids": list(sp.stop_token_ids),
            # vLLM lists the sampled token first, then the best others: one more than asked
            "logprobs": sp.top_logprobs + 1 if sp.top_logprobs else 0,
        }

    def _generate_body(self, request: GenerateRequest) -> dict[str, Any]:
        return {"token_ids": list(request.prompt_ids), "request_id": request.request_id,
                "model": self.model, "sampling_params": self._sampling(request)}

    def _completions_body(self, request: GenerateRequest) -> dict[str, Any]:
        return {"model": self.model, "prompt": list(request.prompt_ids),
                "request_id": request.request_id, "return_token_ids": True,
                **self._sampling(request)}

    def _parse_choice(self, choice: dict[str, Any], request: GenerateRequest) -> CompletionOutput:
        """One ``/inference/v1/generate`` choice (log-probs carry token ids)."""
        token_ids = [int(t) for t in choice.get("token_ids") or []]
        content = (choice.get("logprobs") or {}).get("content") or []
        if len(content) != len(token_ids):
            raise EngineError(f"vLLM returned {len(token_ids)} tokens but {len(content)} "
                              "log-probs; is the server a vLLM with this API (0.32)?")
        num_top = request.sampling.top_logprobs
        top = None
        if num_top:
            top = [[(int(e["token_id"]), float(e["logprob"])) for e in sorted(
                (e for e in entry.get("top_logprobs") or [] if 1 <= e.get("rank", 0) <= num_top),
                key=lambda e: e["rank"])] for entry in content]
        return CompletionOutput(
            token_ids=token_ids, logprobs=[float(e["logprob"]) for e in content],
            versions=self._versions(choice.get("weight_versions"), len(token_ids)),
            finish_reason=_finish_reason(choice), top_logprobs=top)

    def _parse_completion(self, choice: dict[str, Any], request: GenerateRequest,
                          version: int) -> CompletionOutput:
        """One ``/v1/completions`` choice (top log-probs are keyed by text: not returned)."""
        token_ids = [int(t) for t in choice.get("token_ids") or []]
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
        if len(logprobs) != len(token_ids):
            raise EngineError(f"vLLM returned {len(token_ids)} tokens but {len(logprobs)} "
                              "log-probs; was return_token_ids ignored (vLLM < 0.10)?")
        return CompletionOutput(token_ids=token_ids, logprobs=[float(x) for x in logprobs],
                                versions=[version] * len(token_ids),
                                finish_reason=_finish_reason(choice))

    def _versions(self, spans: list[dict[str, Any]] | None, num_tokens: int) -> list[int]:
        """Per-token versions from vLLM's ``[{version, start, end}]`` label spans."""
        if not spans:
            return [self.version] * num_tokens
        versions: list[int] = []
        for span in spans:
            label = str(span["version"])
            if not label.lstrip("-").isdigit():
                raise EngineError(f"vLLM labelled tokens with weight version {label!r}, not an "
                                  "integer; only this engine should set the server's label")
            versions += [int(label)] * (int(span["end"]) - int(span["start"]))
        if len(versions) != num_tokens:
            raise EngineError(f"vLLM's weight-version spans cover {len(versions)} tokens of "
                              f"{num_tokens}")
        return versions

    def _write_tensors(self, named_tensors: Iterable[tuple[str, Any]], name: str) -> str:
        from safetensors.torch import save_file

        folder = self._new_folder(name)
        tensors, seen = {}, set()
        for tensor_name, tensor in named_tensors:
            t = tensor.detach().cpu().contiguous()
            if t.data_ptr() in seen:  # tied weights share storage; safetensors refuses that
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[tensor_name] = t
        if self.tie_word_embeddings and EMBED in tensors and HEAD not in tensors:
            tensors[HEAD] = tensors[EMBED].clone()
        save_file(tensors, str(folder / "model.safetensors"))
        return str(folder)

    def _tie_head(self, path: str, name: str) -> str:
        """A directory linking ``path``'s safetensors plus ``lm_head.weight`` (a copy of the
        embedding) when ``path`` updates the embedding of a tied model."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        folder = self._new_folder(name)
        for file in sorted(Path(path).glob("*.safetensors")):
            (folder / file.name).symlink_to(file)
            with safe_open(str(file), "pt") as reader:
                if EMBED in reader.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    save_file({HEAD: reader.get_tensor(EMBED)},
                              str(folder / "tied-lm-head.safetensors"))
        return str(folder)

    def _new_folder(self, name: str) -> Path:
        if self._weights_dir is None:
            self._weights_dir = Path(tempfile.mkdtemp(prefix="vllm-weights-"))
        folder = self._weights_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                       params: dict[str, str] | None = None) -> dict[str, Any]:
        what = f"{method} {path}"
        try:
            response = await self._http.request(method, path, json=body, params=params)
        except httpx2.TimeoutException as exc:
            raise EngineTimeout(f"the vLLM server at {self.url} did not answer {what} within "
                                f"{self.timeout_s:.0f} s; raise timeout_s or check the server"
                                f"{self._log_hint()}") from exc
        except httpx2.TransportError as exc:
            # refused, or our server process is gone: the gateway drops this replica
            gone = isinstance(exc, httpx2.ConnectError) or (
                self.server is not None and not self.server.running)
            error = EngineUnavailable if gone else EngineError
            raise error(f"cannot reach the vLLM server at {self.url} ({what}: "
                        f"{type(exc).__name__}: {exc}); is it running?"
                        f"{self._log_hint()}") from exc
        return self._json(response, what)

    def _json(self, response: httpx2.Response, what: str) -> dict[str, Any]:
        if response.status_code >= 400:
            message = _error_message(response)
            if response.status_code == 400 and "max_model_len" in message:
                raise ContextLengthExceeded(f"vLLM refused {what}: {message}")
            raise EngineError(f"vLLM answered {what} with HTTP {response.status_code}: {message}")
        try:
            return response.json()
        except ValueError as exc:
            raise EngineError(f"vLLM answered {what} with non-JSON: {response.text[:200]!r}") from exc

    def _log_hint(self) -> str:
        if self.server is None:
            return ""
        state = "running" if self.server.running else f"exited ({self.server.proc.returncode})"
        return (f". The server process is {state}; its last log lines ({self.server.log_path}):"
                f"\n{self.server.log_tail(15)}")


def ties_embeddings(model_dir: str | Path) -> bool:
    """Whether the HF model in ``model_dir`` ties ``lm_head`` to the input embedding
    (``tie_word_embeddings`` of ``config.json`` or its ``text_config``; False when unknown)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def _missing_head(path: str) -> bool:
    """Whether the safetensors in ``path`` hold the embedding but not ``lm_head.weight``."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), "pt") as reader:
            names.update(reader.keys())
    return EMBED in names and HEAD not in names


def _choices(data: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))


def _finish_reason(choice: dict[str, Any]) -> Any:
    reason = choice.get("finish_reason")
    if reason not in _FINISH:
        raise EngineError(f"vLLM finished a completion with reason {reason!r} "
                          f"(stop_reason {choice.get('stop_reason')!r})")
    return _FINISH[reason]


def _error_message(response: httpx2.Response) -> str:
    """The message of a vLLM / FastAPI error body (OpenAI shape, dev-endpoint shape, detail)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    error = body.get("error", body.get("detail")) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)
