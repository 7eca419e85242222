"""Graph rewrites, one per module. The pass lists of each mode live in :mod:`qpass.recipes`."""
