"""Python SDK of the GPU broker (filled in by the client module work)."""
