"""Archon model definitions (plain PyTorch) and HF checkpoint conversion."""

from .args import ModelArgs
from .qwen3 import Transformer
from .state_dict import (
    archon_to_hf,
    from_hf,
    fuse_state,
    hf_to_archon,
    load_hf_checkpoint,
    read_hf_state_dict,
    relayout,
    save_hf_checkpoint,
    to_hf_state_dict,
    unfuse_state,
)

__all__ = [
    "ModelArgs",
    "Transformer",
    "archon_to_hf",
    "from_hf",
    "fuse_state",
    "hf_to_archon",
    "load_hf_checkpoint",
    "read_hf_state_dict",
    "relayout",
    "save_hf_checkpoint",
    "to_hf_state_dict",
    "unfuse_state",
]
