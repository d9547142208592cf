"""The FSDP backend: a transformers causal LM sharded with FSDP2 (``FSDPEngine``)."""

from .checkpoint import load_checkpoint, save_checkpoint
from .engine import FSDPEngine, FSDPPolicyModule

__all__ = ["FSDPEngine", "FSDPPolicyModule", "load_checkpoint", "save_checkpoint"]
