"""SGLang's three weight-update paths, as methods of ``SGLangEngine`` (``WeightsMixin``).

Bodies follow sgl-project/sglang ``python/sglang/srt/managers/io_struct.py``
(``UpdateWeightFromDiskReqInput``, ``UpdateWeightsFromTensorReqInput``,
``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``); each answer is
``{"success", "message"}``, HTTP 400 on failure (an ``EngineError`` with that message).

* **disk** -- ``update_weights_from_disk(dir)``: the server reads HF-named safetensors from a
  directory on its file system. Runs anywhere the server does; the one path ``update_weights``
  uses.
* **tensor** -- ``update_weights_from_tensor(named_tensors)``: tensors travel as CUDA IPC
  handles (``serialize_tensors``: a base64 ``ForkingPickler`` dump, the format of SGLang's
  ``MultiprocessingSerializer``); trainer and server share the host and GPU (colocated).
  **GPU only; not run here.**
* **distributed** -- ``init_weights_update_group`` once, then per update
  ``update_weights_from_distributed(names, dtypes, shapes, broadcast=...)``: the server joins
  an NCCL group at ``rank_offset`` and receives every tensor by ``broadcast(src=0)``; the
  trainer is rank 0 of that group and calls ``broadcast`` while the HTTP request is in
  flight. **GPU only; not run here.**
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .vllm_weights import write_tensors

NamedTensors = Iterable[tuple[str, torch.Tensor]]


def serialize_tensors(named_tensors: NamedTensors) -> str:
    """Base64 text of a ``ForkingPickler`` dump of ``[(name, tensor), ...]``: CUDA tensors
    become IPC handles the server maps (same host and GPU; the tensors must stay alive until
    the update returns)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

    buffer = io.BytesIO()
    ForkingPickler(buffer).dump([(name, tensor.detach()) for name, tensor in named_tensors])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class WeightsMixin:
    """Weight-update methods of ``SGLangEngine`` (which provides ``_updating``,
    ``_request``, ``version`` and ``_new_folder``)."""

    _new_folder: Callable[[str], Path]
    _updating: Callable[..., Awaitable[None]]
    _request: Callable[..., Awaitable[Any]]

    async def update_weights_from_disk(self, model_path: str, *, version: int | None = None,
                                       load_format: str | None = None) -> None:
        """``POST /update_weights_from_disk``: load ``model_path``'s safetensors; take
        ``version`` (default: current + 1), also as the server's label.

        Raises:
            EngineError: the server refused (its message: a missing path, unknown names...).
        """
        body: dict[str, Any] = {"model_path": model_path, "abort_all_requests": False,
                                "flush_cache": True, "keep_pause": True}
        if load_format is not None:
            body["load_format"] = load_format
        await self._updating("/update_weights_from_disk", body, version)

    async def update_weights_from_tensor(
            self, named_tensors: NamedTensors, *, version: int | None = None, tp_size: int = 1,
            load_format: str | None = None,
            serializer: Callable[[NamedTensors], str] = serialize_tensors) -> None:
        """``POST /update_weights_from_tensor`` with one serialized payload per TP rank.

        GPU only (colocated): ``serializer``'s default passes CUDA IPC handles. Not run here.

        Raises:
            EngineError: the server refused the update.
        """
        payload = await asyncio.to_thread(serializer, list(named_tensors))
        body = {"serialized_named_tensors": [payload] * tp_size, "load_format": load_format,
                "flush_cache": True, "abort_all_requests": False}
        await self._updating("/update_weights_from_tensor", body, version)

    async def init_weights_update_group(self, master_address: str, master_port: int,
                                        rank_offset: int, world_size: int, *,
                                        group_name: str = "weight_update_group",
                                        backend: str = "nccl") -> None:
        """``POST /init_weights_update_group``: the server's ranks join a process group at
        ``rank_offset`` (the trainer, rank 0, must join concurrently). GPU only; not run here.

        Raises:
            EngineError: the server could not join (its message).
        """
        await self._request("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, "group_name": group_name,
            "backend": backend})

    async def update_weights_from_distributed(
            self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
            *, broadcast: Callable[[], Any], version: int | None = None,
            group_name: str = "weight_update_group", load_format: str | None = None) -> None:
        """``POST /update_weights_from_distributed`` while ``broadcast()`` (run in a thread)
        sends the tensors from rank 0 of the update group, in ``names`` order.

        Args:
            names, dtypes, shapes: HF names, dtype names (``"bfloat16"``) and shapes.
            broadcast: the trainer's blocking ``torch.distributed.broadcast`` calls.

        Raises:
            EngineError: the server refused the update; ``broadcast``'s own exceptions.
        """
        body = {"names": list(names), "dtypes": list(dtypes),
                "shapes": [list(s) for s in shapes], "group_name": group_name,
                "load_format": load_format, "flush_cache": True, "abort_all_requests": False}

        async def send() -> None:
            await asyncio.to_thread(broadcast)

        await self._updating("/update_weights_from_distributed", body, version, during=send)

    async def _write(self, named_tensors: NamedTensors, name: str) -> str:
        """Write tensors as safetensors into ``name`` inside the weights directory."""
        folder = self._new_folder(name)
        return await asyncio.to_thread(write_tensors, named_tensors, folder, tied=False)
