"""Moving exported weights into inference engines: buckets, in-process, disk, server requests.

``TrainEngine.export_weights()`` yields ``(hf_name, full_tensor)``. From there:

* ``buckets(...)`` groups them into size-bounded lists (what one transfer carries);
* ``push_local(engine, ...)`` loads them into an in-process engine (``LocalEngine``);
* ``save_safetensors_dir(...)`` writes a sharded safetensors directory (with an HF index) for
  another process; ``WeightUpdate(path=...)`` / ``load_safetensors_dir`` read it back;
* ``SharedWeights.write(...)`` copies them into one POSIX shared-memory block whose small,
  picklable ``manifest`` lets another process on the host read them (``read_shared``);
* ``weight_transport`` streams them to engines in bounded buckets (tensors, shared memory,
  safetensors directory, process group); ``Gateway.push_weights`` runs the pause -> update ->
  resume protocol over a policy's replicas;
* ``sglang_update_from_disk`` / ``sglang_update_from_tensor`` / ``vllm_collective_rpc``
  build the HTTP requests for SGLang / vLLM servers (sent by the remote engine clients).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from areal_agents.engines.base import WeightUpdate

NamedTensors = Iterable[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 256 * 2**20
INDEX_FILE = "model.safetensors.index.json"


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def buckets(named_tensors: NamedTensors, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive lists of ``(name, tensor)`` of at most ``bucket_bytes`` each.

    A tensor larger than ``bucket_bytes`` forms a bucket of its own. Order is preserved.

    Raises:
        ValueError: ``bucket_bytes`` < 1.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1 (got {bucket_bytes})")
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        n = tensor_bytes(t)
        if current and size + n > bucket_bytes:
            yield current
            current, size = [], 0
        current.append((name, t))
        size += n
    if current:
        yield current


async def push_local(engine: Any, named_tensors: NamedTensors, version: int | None = None) -> None:
    """Load weights into an in-process engine (``LocalEngine``) via ``update_weights``."""
    await engine.update_weights(WeightUpdate(named_tensors=named_tensors, version=version))


def save_safetensors_dir(
    named_tensors: NamedTensors, path: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> str:
    """Write ``model-XXXXX-of-YYYYY.safetensors`` shards plus an HF index into ``path``.

    The directory is written to ``<path>.partial`` and renamed into place, so a reader never
    sees a half-written update (a stale ``.partial`` of a crashed writer is removed first). An
    existing ``path`` is replaced. Each shard holds at most ``bucket_bytes`` of tensor data (a
    larger tensor gets a shard of its own).

    Returns:
        ``path``.
    """
    final_path = os.path.abspath(path)
    os.makedirs(os.path.dirname(final_path), exist_ok=True)
    tmp = final_path + ".partial"
    if os.path.exists(tmp):  # left by a writer that crashed
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        _write_shards(named_tensors, tmp, bucket_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final_path):
        shutil.rmtree(final_path)
    os.rename(tmp, final_path)
    return path


def _write_shards(named_tensors: NamedTensors, directory: str, bucket_bytes: int) -> None:
    """One ``model-XXXXX-of-YYYYY.safetensors`` file per bucket, plus the HF index."""
    shard_names: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    for bucket in buckets(named_tensors, bucket_bytes):  # (enumerate's tuple would keep it)
        fname = f"shard-{len(shard_names):05d}.safetensors"
        save_file({n: t.detach().cpu().contiguous() for n, t in bucket},
                  os.path.join(directory, fname))
        shard_names.append(fname)
        for n, t in bucket:
            weight_map[n] = fname
            total += tensor_bytes(t)
        del bucket, t  # written: not held while the next bucket fills (two buckets at most)
    k = len(shard_names)
    final = {f: f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i, f in enumerate(shard_names)}
    for old, new in final.items():
        os.rename(os.path.join(directory, old), os.path.join(directory, new))
    index = {"metadata": {"total_size": total},
             "weight_map": {n: final[f] for n, f in weight_map.items()}}
    with open(os.path.join(directory, INDEX_FILE), "w") as fh:
        json.dump(index, fh, indent=1)


def load_safetensors_dir(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from every ``*.safetensors`` file of ``path`` (sorted).

    Raises:
        FileNotFoundError: ``path`` holds no safetensors files.
    """
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}; write them with save_safetensors_dir")
    for f in files:
        yield from load_file(os.path.join(path, f)).items()


class SharedWeights:
    """Weights in one ``multiprocessing.shared_memory`` block, for another local process.

    The writer keeps this object alive until readers are done, then calls ``close()`` (which
    unlinks the block). ``manifest`` is a small picklable dict (block name, and per tensor its
    name, dtype, shape and byte offset) to send to the reader.

    Example:
        >>> shared = SharedWeights.write(engine.export_weights())  # doctest: +SKIP
        >>> queue.put(shared.manifest)  # doctest: +SKIP
    """

    def __init__(self, block: Any, manifest: dict[str, Any]) -> None:
        self.block = block
        self.manifest = manifest

    @classmethod
    def write(cls, named_tensors: NamedTensors) -> SharedWeights:
        from multiprocessing import shared_memory

        items = [(n, t.detach().cpu().contiguous()) for n, t in named_tensors]
        entries, offset = [], 0
        for n, t in items:
            offset = (offset + 63) // 64 * 64  # aligned views
            entries.append((n, str(t.dtype).removeprefix("torch."), list(t.shape), offset))
            offset += tensor_bytes(t)
        block = shared_memory.SharedMemory(create=True, size=max(offset, 1))
        buf = torch.frombuffer(block.buf, dtype=torch.uint8)
        for (_, _, _, off), (_, t) in zip(entries, items, strict=True):
            buf[off : off + tensor_bytes(t)].copy_(t.reshape(-1).view(torch.uint8))
        del buf
        return cls(block, {"block": block.name, "tensors": entries})

    def close(self) -> None:
        """Release and unlink the block (idempotent)."""
        if self.block is not None:
            self.block.close()
            self.block.unlink()
            self.block = None

    def __enter__(self) -> SharedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_shared(manifest: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` copies out of a ``SharedWeights`` block (another process)."""
    from multiprocessing import resource_tracker, shared_memory

    block = shared_memory.SharedMemory(name=manifest["block"])
    # the writer owns the block: stop this process's tracker from unlinking it at exit
    resource_tracker.unregister(block._name, "shared_memory")
    try:
        buf = torch.frombuffer(block.buf, dtype=torch.uint8)
        for name, dtype, shape, off in manifest["tensors"]:
            dt = getattr(torch, dtype)
            n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            yield name, buf[off : off + n].view(dt).reshape(shape).clone()
        del buf
    finally:
        block.close()


@dataclass(frozen=True)
class HTTPRequest:
    """One request for an inference server: ``POST {base_url}{path}`` with a JSON body."""

    path: str
    json: dict[str, Any] = field(default_factory=dict)
    method: str = "POST"


def sglang_update_from_disk(path: str, version: int | None = None, *, load_format: str | None = None,
                            abort_all_requests: bool = False) -> HTTPRequest:
    """SGLang ``/update_weights_from_disk``: reload the model from an HF/safetensors dir."""
    body: dict[str, Any] = {"model_path": path, "abort_all_requests": abort_all_requests}
    if load_format is not None:
        body["load_format"] = load_format
    if version is not None:
        body["weight_version"] = str(version)
    return HTTPRequest("/update_weights_from_disk", body)


def serialize_named_tensors(named_tensors: NamedTensors) -> str:
    """Base64 text of ``torch.save(list of (name, tensor))`` (portable, copies the data)."""
    buf = io.BytesIO()
    torch.save([(n, t.detach().cpu().contiguous()) for n, t in named_tensors], buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def deserialize_named_tensors(text: str) -> list[tuple[str, torch.Tensor]]:
    """Inverse of ``serialize_named_tensors``."""
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def sglang_update_from_tensor(bucket: NamedTensors, version: int | None = None, *, tp_size: int = 1,
                              flush_cache: bool = True) -> HTTPRequest:
    """SGLang ``/update_weights_from_tensor`` for one bucket.

    ``serialized_named_tensors`` holds one serialized copy per tensor-parallel rank, as the
    endpoint expects. SGLang's own serializer passes shared-memory handles (same host);
    this one copies the data (``serialize_named_tensors``), so a server-side loader must
    decode it with ``deserialize_named_tensors``.
    """
    payload = serialize_named_tensors(bucket)
    body: dict[str, Any] = {
        "serialized_named_tensors": [payload] * tp_size,
        "load_format": None,
        "flush_cache": flush_cache,
    }
    if version is not None:
        body["weight_version"] = str(version)
    return HTTPRequest("/update_weights_from_tensor", body)


def vllm_collective_rpc(method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> HTTPRequest:
    """vLLM ``/collective_rpc`` (dev mode): call ``method`` on every worker with JSON args."""
    return HTTPRequest("/collective_rpc", {"method": method, "args": list(args), "kwargs": kwargs,
                                           "timeout": timeout})


def vllm_update_from_disk(path: str, version: int | None = None) -> HTTPRequest:
    """vLLM request loading a safetensors directory into every worker.

    Uses ``/collective_rpc`` with the worker method ``update_weights_from_disk(path)``, which a
    worker extension (``--worker-extension-cls``) must provide; vLLM has no built-in endpoint.
    """
    return vllm_collective_rpc("update_weights_from_disk", path, version=version)
