"""The FSDP backend: a transformers causal LM sharded with FSDP2 (``FSDPEngine``)."""

from .checkpoint import load_checkpoint, save_checkpoint
from .engine import FSDPEngine, PolicyModule

__all__ = ["FSDPEngine", "PolicyModule", "load_checkpoint", "save_checkpoint"]
