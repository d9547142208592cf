"""Archon: the PyTorch-native training backend (plain-PyTorch models; FSDP2, TP, PP, LoRA, EP)."""

from .engine import ArchonEngine, ArchonPolicyModule, build_model
from .models import ModelArgs, Transformer
from .parallel_dims import ParallelDims

__all__ = ["ArchonEngine", "ArchonPolicyModule", "ModelArgs", "ParallelDims", "Transformer",
           "build_model"]
