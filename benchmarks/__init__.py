"""Benchmark harness for qpass on the real models in ../shared/models (see benchmarks/evaluate.py)."""
