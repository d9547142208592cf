"""fsdp backend."""
