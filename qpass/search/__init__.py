"""Searches over quantization plans driven by validation (qpass.search.precision: an accuracy target)."""
