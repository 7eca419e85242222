"""Graph rewrites, one per module. The pipelines (literal lists) live in :mod:`qpass.pipeline`."""
