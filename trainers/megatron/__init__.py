"""megatron backend."""
