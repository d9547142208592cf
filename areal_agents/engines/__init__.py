"""Inference engines behind the gateway."""

from .base import (
    CompletionOutput,
    GenerateRequest,
    GenerateResult,
    InferenceEngine,
    OnTokens,
    SamplingParams,
    TokenDelta,
    WeightUpdate,
)

__all__ = [
    "CompletionOutput",
    "GenerateRequest",
    "GenerateResult",
    "InferenceEngine",
    "LocalEngine",
    "OnTokens",
    "RemoteEngine",
    "SGLangEngine",
    "SamplingParams",
    "TokenDelta",
    "VLLMEngine",
    "WeightUpdate",
]


def __getattr__(name: str) -> object:
    # LocalEngine pulls in transformers; import it only when asked for
    if name == "LocalEngine":
        from .local import LocalEngine

        return LocalEngine
    if name == "RemoteEngine":
        from .remote import RemoteEngine

        return RemoteEngine
    if name == "SGLangEngine":
        from .sglang import SGLangEngine

        return SGLangEngine
    if name == "VLLMEngine":
        from .vllm import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module 'areal_agents.engines' has no attribute {name!r}")
