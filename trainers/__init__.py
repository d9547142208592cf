"""Training backends (archon, fsdp, megatron), the Trainer and weight sync."""
