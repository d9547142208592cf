"""Building a policy's inference engines from its ``InferencePlacement``.

=============  =================================================================================
``in_process``  one ``LocalEngine`` on the served copy of the model, on ``device`` (the
                default; the fastest on a laptop)
``server``      ``replicas`` engine servers (``python -m areal_agents.engines.service``), each
                a ``LocalEngine`` in its own process, reached by ``RemoteEngine``; the model
                and tokenizer are saved with ``save_pretrained`` to
                ``run_dir/serving/<policy>`` and loaded by every server. With ``urls`` the
                engines attach to running servers instead (token: ``server_args["token"]``
                or ``$AREAL_AGENTS_ENGINE_TOKEN``).
``vllm``        ``replicas`` vLLM servers (``VLLMEngine.launch``) on the model saved as above;
                ``python`` is the interpreter of the vLLM venv
``sglang``      the same with SGLang servers (``SGLangEngine.launch``; GPU); ``python`` is the
                interpreter of the SGLang venv
=============  =================================================================================

How trained weights reach the engines (the transport and ``bucket_mb``) is
``trainers/weight_push.py``'s; a ``server`` replica streams ``shm`` updates through a block of
``bucket_mb``, and a policy's ``gloo`` replicas share one process group with the controller
(``ReplicaGroup``): one broadcast per update, whatever the number of replicas.
``server`` replicas run on the CPU (``device="cuda"`` is refused: the engine server has no
device option yet).

``server_args`` are keyword arguments of the engine's ``launch``: for ``server``
(``RemoteEngine.launch``) ``threads`` (OMP/torch threads per server, default 1),
``max_batch_size``, ``restart_limit`` (restarts of a server that died, default 0),
``startup_timeout_s`` and ``timeout_s``; for ``vllm`` those of ``VLLMEngine.launch``
(``dtype``, ``max_model_len``, ``kv_cache_gib``, ``server_args`` (a list of CLI flags)...);
for ``sglang`` those of ``SGLangEngine.launch`` (``dtype``, ``context_length``,
``mem_fraction_static``, ``server_args``, ``top_p_window``...). Both take weights as
safetensors directories only (transport ``disk``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from areal_agents.engines.base import InferenceEngine
from areal_agents.errors import ConfigError

from .placement import InferencePlacement

__all__ = ["LAUNCH_ARGS", "build_engines"]

LAUNCH_ARGS = ("threads", "max_batch_size", "restart_limit", "startup_timeout_s", "timeout_s")
"""The ``server_args`` a ``server`` placement accepts (``RemoteEngine.launch`` arguments)."""


async def build_engines(name: str, placement: InferencePlacement, model: Any,
                        tokenizer: Any, run_dir: str | Path | None, *,
                        max_batch_size: int = 32,
                        write_model: Callable[[Path], None] | None = None
                        ) -> list[InferenceEngine]:
    """The replicas serving policy ``name``, ready for ``Gateway.add_policy``.

    Args:
        name: the policy's name (names its serving directory).
        placement: how to serve it.
        model: the served copy of the model (``in_process`` serves this very object).
        tokenizer: its tokenizer.
        run_dir: where ``server`` replicas load the model from (``serving/<name>``; None: a
            temporary ``serving-*`` directory, removed once every replica is closed).
        max_batch_size: rows per decode step (``server_args["max_batch_size"]`` overrides).
        write_model: writes the model (config and weights, not the tokenizer) into the
            directory it is given, for the replicas that load it (default:
            ``model.save_pretrained``). A worker group's rank 0 writes it this way, so
            ``model`` may then be a skeleton without weights (``device("meta")``).

    Raises:
        ConfigError: a kind or transport not served here, unknown ``server_args``, or
            ``device="cuda"`` where CUDA is not available (or for ``server``).
        EngineError: a server did not start (with its log tail); started ones are stopped.
    """
    if placement.kind == "in_process":
        from areal_agents.engines.local import LocalEngine

        return [LocalEngine(model, tokenizer, device=placement.resolved_device(),
                            max_batch_size=max_batch_size,
                            shared_head_tokens=placement.shared_head_tokens)]
    if placement.kind in ("vllm", "sglang"):
        _check_http_servers(placement)
        if placement.urls:
            return await _attach_http_servers(placement)
        return await _in_model_dir(name, model, tokenizer, run_dir, write_model,
                                   lambda d: _launch_http_servers(d, placement))
    if placement.kind != "server":
        raise ConfigError(f"Policy.inference.kind={placement.kind!r} is not built by "
                          "areal_agents.trainers.serving yet; use 'in_process', 'server', "
                          "'vllm' or 'sglang'")
    transport = placement.resolved_transport()
    if transport not in ("shm", "disk", "gloo"):
        raise ConfigError(f"Policy.inference: kind='server' moves weights by 'shm', 'disk' or "
                          f"'gloo', not {transport!r}")
    if placement.device == "cuda":
        raise ConfigError("Policy.inference: kind='server' engines run on the CPU (the engine "
                          "server has no device option yet); use kind='in_process' or 'vllm' "
                          "for device='cuda', or omit device")
    unknown = sorted(set(placement.server_args) - {*LAUNCH_ARGS, "token"})
    if unknown:
        raise ConfigError(f"Policy.inference.server_args: unknown {unknown}; a server placement "
                          f"takes {list(LAUNCH_ARGS)} (and 'token' with urls)")
    kwargs = {"max_batch_size": max_batch_size, "transport": transport,
              "bucket_bytes": placement.bucket_bytes,
              **{k: v for k, v in placement.server_args.items() if k != "token"}}
    if placement.urls:
        engines = await _attach_all(placement, kwargs)
    else:
        engines = await _in_model_dir(name, model, tokenizer, run_dir, write_model,
                                      lambda d: _launch_all(d, placement, kwargs))
    if transport == "gloo":  # one weight-update group, one broadcast for all replicas
        from areal_agents.engines.weights_group import ReplicaGroup

        group = ReplicaGroup(transport, placement.bucket_bytes,
                             float(kwargs.get("timeout_s", 600.0)))
        for engine in engines:
            if engine.transport == transport:  # type: ignore[attr-defined]  (not restartable)
                engine.join_replica_group(group)  # type: ignore[attr-defined]
    return engines


async def _in_model_dir(name: str, model: Any, tokenizer: Any, run_dir: str | Path | None,
                        write_model: Callable[[Path], None] | None,
                        launch: Callable[[Path], Awaitable[list[InferenceEngine]]]
                        ) -> list[InferenceEngine]:
    """Write the model and tokenizer to ``<run_dir or a temporary root>/serving/<name>``, then
    ``launch`` the replicas that load it. A temporary root is removed when the launch fails or
    once every replica is closed (or garbage-collected)."""
    root = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="serving-"))
    try:
        model_dir = root / "serving" / name
        model_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(write_model or model.save_pretrained, model_dir)
        tokenizer.save_pretrained(model_dir)
        engines = await launch(model_dir)
    except BaseException:
        if run_dir is None:
            shutil.rmtree(root, ignore_errors=True)
        raise
    if run_dir is None:
        _remove_after(root, engines)
    return engines


def _remove_after(root: Path, engines: list[InferenceEngine]) -> None:
    """Remove ``root`` once every engine is closed (a ``RemoteEngine``'s ``close_callbacks``)
    or collected (``weakref.finalize``, also at interpreter exit)."""
    left = len(engines)

    def release() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            shutil.rmtree(root, ignore_errors=True)

    for engine in engines:
        done = weakref.finalize(engine, release)  # runs once, whichever comes first
        callbacks = getattr(engine, "close_callbacks", None)
        if isinstance(callbacks, list):
            callbacks.append(done)
    if not engines:
        shutil.rmtree(root, ignore_errors=True)


async def _launch_all(model_dir: Path, placement: InferencePlacement,
                      kwargs: dict[str, Any]) -> list[InferenceEngine]:
    from areal_agents.engines.remote import RemoteEngine

    logs = model_dir / "logs"

    async def one(index: int) -> RemoteEngine:
        return await RemoteEngine.launch(model_dir, python=placement.python,
                                         log_path=logs / f"replica{index}.log", **kwargs)

    results = await asyncio.gather(*(one(i) for i in range(placement.replicas)),
                                   return_exceptions=True)
    engines = [r for r in results if isinstance(r, RemoteEngine)]
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        for engine in engines:
            await engine.close()
        raise failure
    return list(engines)


async def _attach_all(placement: InferencePlacement,
                      kwargs: dict[str, Any]) -> list[InferenceEngine]:
    from areal_agents.engines.remote import RemoteEngine
    from areal_agents.engines.service import TOKEN_ENV

    token = placement.server_args.get("token") or os.environ.get(TOKEN_ENV)
    if not token:
        raise ConfigError(f"Policy.inference.urls: the servers' token is needed; set "
                          f"server_args.token or ${TOKEN_ENV}")
    attach = {k: kwargs[k] for k in ("timeout_s", "transport", "bucket_bytes") if k in kwargs}
    return [await RemoteEngine.attach(url, token=token, **attach) for url in placement.urls]


def _check_http_servers(placement: InferencePlacement) -> None:
    """Refuse a ``vllm`` / ``sglang`` placement these servers cannot run (``ConfigError``)."""
    engine = _http_engine_class(placement.kind)
    label = {"vllm": "vLLM", "sglang": "SGLang"}[placement.kind]
    if placement.resolved_transport() != "disk":
        raise ConfigError(f"Policy.inference: kind={placement.kind!r} loads weights from "
                          f"safetensors files only (transport 'disk'), not "
                          f"{placement.transport!r}; {label}'s NCCL weight transfer is not wired "
                          "into the weight push yet")
    if placement.urls:
        return
    if not (placement.python or os.environ.get(engine.python_env)):
        raise ConfigError(f"Policy.inference: kind={placement.kind!r} launches {label} servers "
                          f"and needs python (the interpreter of a venv with {label}) or "
                          f"${engine.python_env}; see docs/inference_servers.md")


def _http_engine_class(kind: str) -> Any:
    if kind == "vllm":
        from areal_agents.engines.vllm import VLLMEngine

        return VLLMEngine
    from areal_agents.engines.sglang import SGLangEngine

    return SGLangEngine


async def _attach_http_servers(placement: InferencePlacement) -> list[InferenceEngine]:
    engine = _http_engine_class(placement.kind)
    return [await engine.attach(url) for url in placement.urls]


async def _launch_http_servers(model_dir: Path,
                               placement: InferencePlacement) -> list[InferenceEngine]:
    """``vllm`` / ``sglang`` replicas on ``model_dir``, launched one at a time."""
    engine_class = _http_engine_class(placement.kind)
    engines: list[InferenceEngine] = []
    try:
        for index in range(placement.replicas):  # one at a time: each start is heavy
            engines.append(await engine_class.launch(
                model_dir, python=placement.python,
                log_path=model_dir / "logs" / f"{placement.kind}{index}.log",
                **placement.server_args))
    except BaseException:
        for engine in engines:
            await engine.close()
        raise
    return engines
