"""How weights reach a vLLM server: safetensors directories for its in-place
``reload_weights`` (tied embeddings included), and the bodies of its NCCL weight transfer.

vLLM 0.32's in-place reload unties ``lm_head`` from ``embed_tokens``: unless
``lm_head.weight`` is in the files, the head keeps its old values while the embedding changes
(seen on a tied Qwen3). HF exports and ``save_pretrained`` omit that name for tied models, so
for those the directories written here always carry it (a copy of the embedding).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"  # the tied pair (HF names)


def ties_embeddings(model_dir: str | Path) -> bool:
    """Whether the HF model in ``model_dir`` ties ``lm_head`` to the input embedding
    (``tie_word_embeddings`` of ``config.json`` or its ``text_config``; False when unknown)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def write_tensors(named_tensors: Iterable[tuple[str, Any]], folder: Path, *, tied: bool) -> str:
    """Write HF-named tensors as ``folder/model.safetensors`` (plus the head when ``tied``)."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, tensor in named_tensors:
        t = tensor.detach().cpu().contiguous()
        if t.data_ptr() in seen:  # tied weights share storage; safetensors refuses that
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    if tied and EMBED in tensors and HEAD not in tensors:
        tensors[HEAD] = tensors[EMBED].clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


def missing_head(path: str | Path) -> bool:
    """Whether the safetensors in ``path`` hold the embedding but not ``lm_head.weight``."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), "pt") as reader:
            names.update(reader.keys())
    return EMBED in names and HEAD not in names


def with_head(path: str | Path, folder: Path) -> str:
    """``folder`` linking ``path``'s safetensors plus ``lm_head.weight`` = the embedding
    (``path`` itself is left untouched; its index file is not linked, so vLLM reads all)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for file in sorted(Path(path).glob("*.safetensors")):
        (folder / file.name).symlink_to(file.resolve())
        with safe_open(str(file), "pt") as reader:
            if EMBED in reader.keys():  # noqa: SIM118 (safe_open has no __contains__)
                save_file({HEAD: reader.get_tensor(EMBED)},
                          str(folder / "tied-lm-head.safetensors"))
    return str(folder)


# ---- vLLM's NCCL weight transfer (``VLLM_SERVER_DEV_MODE=1``; GPU) ----------------------------
#
# vLLM 0.32's RL routes (vllm/entrypoints/rl/online/api_router.py), with the NCCL backend
# (the default of ``--weight-transfer-config``):
#
#     POST /init_weight_transfer_engine  {"init_info": nccl_init_info(...)}      once
#     POST /start_weight_update                                                  per update
#     POST /update_weights               {"update_info": nccl_update_info(...)}  while the
#                                         trainer (rank 0) broadcasts the tensors in order
#     POST /finish_weight_update
#
# The sending side is vLLM's own (``NCCLTrainerWeightTransferEngine`` or a
# ``PyNcclCommunicator`` joined through ``StatelessProcessGroup`` on the same address): its
# rendezvous and, when ``packed``, its buffer layout are vLLM's, so the trainer process needs
# vllm installed. With ``packed=False`` the tensors go one broadcast each, in ``names`` order.


def nccl_init_info(master_address: str, master_port: int, world_size: int, *,
                   rank_offset: int = 1, packed: bool = False,
                   packed_buffer_size_bytes: int | None = None,
                   packed_num_buffers: int | None = None) -> dict[str, Any]:
    """The ``init_info`` of ``POST /init_weight_transfer_engine`` (vLLM's
    ``NCCLWeightTransferInitInfo``): the server's workers take ranks ``rank_offset`` ..
    ``rank_offset + workers - 1`` of a ``world_size`` group whose store the trainer (rank 0)
    hosts at ``master_address:master_port``.

    Raises:
        ValueError: ``rank_offset`` < 1 (rank 0 is the trainer) or ``world_size`` too small.

    Example:
        >>> nccl_init_info("10.0.0.1", 29500, 2)
        {'master_address': '10.0.0.1', 'master_port': 29500, 'rank_offset': 1, 'world_size': 2, 'packed': False}
    """
    if rank_offset < 1 or world_size <= rank_offset:
        raise ValueError(f"rank_offset={rank_offset}, world_size={world_size}: the trainer is "
                         "rank 0, so rank_offset >= 1 and world_size > rank_offset")
    info: dict[str, Any] = {"master_address": master_address, "master_port": int(master_port),
                            "rank_offset": rank_offset, "world_size": world_size,
                            "packed": packed}
    if packed_buffer_size_bytes is not None:
        info["packed_buffer_size_bytes"] = int(packed_buffer_size_bytes)
    if packed_num_buffers is not None:
        info["packed_num_buffers"] = int(packed_num_buffers)
    return info


def nccl_update_info(names: Iterable[str], dtype_names: Iterable[str],
                     shapes: Iterable[Iterable[int]]) -> dict[str, list[Any]]:
    """The ``update_info`` of ``POST /update_weights`` (vLLM's
    ``NCCLWeightTransferUpdateInfo``): the HF names, dtype names (``"bfloat16"``) and shapes
    of the tensors the trainer broadcasts, in that order.

    Raises:
        ValueError: the three lists differ in length, or a dtype name has a ``torch.`` prefix.

    Example:
        >>> nccl_update_info(["w"], ["float32"], [(2, 3)])
        {'names': ['w'], 'dtype_names': ['float32'], 'shapes': [[2, 3]]}
    """
    info = {"names": list(names), "dtype_names": list(dtype_names),
            "shapes": [[int(d) for d in shape] for shape in shapes]}
    if not len(info["names"]) == len(info["dtype_names"]) == len(info["shapes"]):
        raise ValueError(f"names, dtype_names and shapes differ in length "
                         f"({len(info['names'])}, {len(info['dtype_names'])}, "
                         f"{len(info['shapes'])})")
    prefixed = [d for d in info["dtype_names"] if d.startswith("torch.")]
    if prefixed:
        raise ValueError(f"dtype names are torch attribute names without 'torch.' "
                         f"(e.g. 'bfloat16'), got {prefixed[:3]}")
    return info
