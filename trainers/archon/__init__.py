"""archon backend."""
