"""archon/models backend."""
