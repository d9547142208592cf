"""Inference engines behind the gateway."""

from .base import (
    CompletionOutput,
    GenerateRequest,
    GenerateResult,
    InferenceEngine,
    SamplingParams,
    WeightUpdate,
)

__all__ = [
    "CompletionOutput",
    "GenerateRequest",
    "GenerateResult",
    "InferenceEngine",
    "SamplingParams",
    "WeightUpdate",
]
