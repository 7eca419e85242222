"""Evaluation: original vs quantized on onnxruntime (metrics, per-layer error, placement, latency) and the tolerance verdict."""
